//! `fs.delete`: remove a file, a symlink (the link itself, never its target) or a directory.

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use super::{blocking, checked_path, io_failure, is_root, type_name};
use crate::{
    Error,
    sessions::Workspace,
    tools::{Tool, ToolContext, ToolOutput, parse_args},
};

/// The fs.delete tool.
pub(crate) struct Delete;

#[derive(Deserialize)]
struct Args {
    path: String,
    #[serde(default)]
    recursive: bool,
}

impl Tool for Delete {
    fn name(&self) -> &'static str {
        "fs.delete"
    }

    fn description(&self) -> &'static str {
        "Deletes a file, symlink or empty directory in the session workspace; a non-empty \
         directory needs recursive: true. The workspace root cannot be deleted."
    }

    fn input_schema(&self) -> Json {
        json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "minLength": 1, "description": "Path relative to the workspace."},
                "recursive": {"type": "boolean", "default": false, "description": "Delete a directory and everything in it."}
            },
            "required": ["path"],
            "additionalProperties": false
        })
    }

    fn read_only(&self) -> bool {
        false
    }

    fn call<'a>(
        &'a self,
        ctx: &'a ToolContext,
        args: Json,
    ) -> BoxFuture<'a, Result<ToolOutput, Error>> {
        Box::pin(async move {
            let args: Args = parse_args(args)?;
            blocking(ctx, move |ws| delete(ws, &args)).await
        })
    }
}

fn delete(ws: &Workspace, args: &Args) -> Result<ToolOutput, Error> {
    let rel = checked_path(&args.path)?;
    if is_root(&rel) {
        return Err(root_refusal(&args.path));
    }
    let dir = ws.dir();
    let meta = match dir.symlink_metadata(&rel) {
        Ok(meta) => meta,
        Err(err) => return io_failure(&err, &args.path, "delete"),
    };
    // `link/` or `a/b/..` can still name the root once symlinks are resolved.
    if meta.is_dir() && dir.canonicalize(&rel).is_ok_and(|real| is_root(&real)) {
        return Err(root_refusal(&args.path));
    }
    let removed = if meta.is_dir() {
        if args.recursive {
            dir.remove_dir_all(&rel)
        } else {
            match dir.remove_dir(&rel) {
                Err(err) if err.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                    return Ok(ToolOutput::failed(format!(
                        "cannot delete `{}`: the directory is not empty (pass recursive: true to \
                         delete it and everything in it)",
                        args.path
                    )));
                }
                other => other,
            }
        }
    } else {
        dir.remove_file(&rel)
    };
    if let Err(err) = removed {
        return io_failure(&err, &args.path, "delete");
    }
    let mut info = Map::new();
    info.insert("path".to_owned(), json!(args.path));
    info.insert("deleted".to_owned(), json!(type_name(meta.file_type())));
    Ok(ToolOutput::object(info))
}

fn root_refusal(path: &str) -> Error {
    Error::InvalidArgument {
        field: "path".to_owned(),
        message: format!(
            "path {path:?} is the workspace root, which cannot be deleted: delete its entries \
             instead, or close the session"
        ),
    }
}
