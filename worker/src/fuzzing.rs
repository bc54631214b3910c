//! The worker's hostile-input surfaces, reachable from the cargo-fuzz targets in `fuzz/` (not an
//! API: hidden from the docs, and nothing in the worker uses it). Each function runs the same
//! code the tools run and reports failures as text, so a target can check properties without
//! naming private types.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use heist_proto::{ids::SessionId, v1::Manifest};
use serde_json::Value as Json;

use crate::{
    checkpoint::{manifest, restore::Plan},
    sessions::Workspace,
    tools::{self, Registry, Want},
};

/// `calc`'s evaluator: the value, or the message and 1-based column of the error.
pub fn calc(
    expression: &str,
    variables: &HashMap<String, f64>,
) -> Result<f64, (String, Option<usize>)> {
    tools::calc_evaluate(expression, variables).map_err(|err| (err.message, err.column))
}

/// The lexical check every fs tool applies to a caller's path first.
pub fn checked_path(raw: &str) -> Result<PathBuf, String> {
    tools::checked_path(raw).map_err(|err| err.to_string())
}

/// A session workspace at an existing directory, for [`resolve`].
pub struct FuzzWorkspace(Arc<Workspace>);

impl FuzzWorkspace {
    /// Opens the directory `path` as a workspace.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let id = SessionId::parse("s-fuzz").map_err(std::io::Error::other)?;
        Ok(Self(Arc::new(Workspace::open(id, path.to_path_buf())?)))
    }

    /// The workspace's absolute path.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Resolves a caller's path beneath the workspace as exec's `cwd` is resolved (a directory
    /// when `dir`, else a regular file): the absolute path, or the refusal as text.
    pub fn resolve(&self, raw: &str, dir: bool) -> Result<PathBuf, String> {
        let want = if dir { Want::Dir } else { Want::File };
        tools::resolve_path(&self.0, raw, "path", want).map_err(|err| err.to_string())
    }
}

/// The built-in tools' argument validators.
pub struct Validators(Registry);

impl Validators {
    /// The validators of every built-in tool.
    pub fn builtin() -> Result<Self, String> {
        Registry::builtin().map(Self).map_err(|err| err.to_string())
    }

    /// The tools' names, ordered.
    pub fn names(&self) -> Vec<String> {
        self.0.specs().into_iter().map(|spec| spec.name).collect()
    }

    /// The input schema of `tool`, as JSON.
    pub fn schema(&self, tool: &str) -> Option<Json> {
        let spec = self.0.specs().into_iter().find(|spec| spec.name == tool)?;
        spec.input_schema
            .as_ref()
            .map(heist_proto::json::struct_to_json)
    }

    /// Checks `args` against `tool`'s schema: `Err((field, message))` for a violation.
    pub fn check(&self, tool: &str, args: &Json) -> Result<(), (String, String)> {
        match self.0.check_args(tool, args) {
            Ok(()) => Ok(()),
            Err(crate::Error::SchemaViolation { field, message }) => Err((field, message)),
            Err(other) => Err((String::new(), other.to_string())),
        }
    }
}

/// The check a manifest passes before a restore materialises it.
pub fn validate_manifest(manifest: &Manifest) -> Result<(), String> {
    manifest::validate(manifest).map_err(|err| err.to_string())
}

/// What a restore would create from a validated manifest: directories (in creation order),
/// files and symlinks, as relative paths.
pub fn restore_plan(manifest: &Manifest) -> (Vec<String>, Vec<String>, Vec<String>) {
    let plan = Plan::new(manifest);
    (
        plan.dirs.into_iter().map(|(path, _)| path).collect(),
        plan.files.into_iter().map(|file| file.path).collect(),
        plan.symlinks.into_iter().map(|(path, _)| path).collect(),
    )
}
