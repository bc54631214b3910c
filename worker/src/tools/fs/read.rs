//! `fs.read`: a file's content as UTF-8 text or base64.

use std::io::Read as _;

use base64::Engine as _;
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use super::{blocking, checked_path, io_failure, open_regular};
use crate::{
    Error,
    sessions::Workspace,
    tools::{Content, Limits, Tool, ToolContext, ToolOutput, parse_args},
};

/// How file content travels in a JSON string.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Encoding {
    /// UTF-8 text.
    #[default]
    Utf8,
    /// Standard base64 with padding.
    Base64,
}

impl Encoding {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Utf8 => "utf8",
            Self::Base64 => "base64",
        }
    }
}

/// The fs.read tool.
pub(crate) struct Read;

#[derive(Deserialize)]
struct Args {
    path: String,
    #[serde(default)]
    encoding: Encoding,
}

impl Tool for Read {
    fn name(&self) -> &'static str {
        "fs.read"
    }

    fn description(&self) -> &'static str {
        "Reads a file in the session workspace. Returns its content as a text block (UTF-8, or \
         base64 with encoding \"base64\") and {path, size, encoding} as structured content. \
         Files over the worker's size limit are refused."
    }

    fn input_schema(&self) -> Json {
        json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "minLength": 1, "description": "File path relative to the workspace."},
                "encoding": {"enum": ["utf8", "base64"], "default": "utf8", "description": "utf8 (the default) or base64 for binary files."}
            },
            "required": ["path"],
            "additionalProperties": false
        })
    }

    fn read_only(&self) -> bool {
        true
    }

    fn call<'a>(
        &'a self,
        ctx: &'a ToolContext,
        args: Json,
    ) -> BoxFuture<'a, Result<ToolOutput, Error>> {
        Box::pin(async move {
            let args: Args = parse_args(args)?;
            let limits = ctx.limits;
            blocking(ctx, move |ws| read(ws, &args, limits)).await
        })
    }
}

fn read(ws: &Workspace, args: &Args, limits: Limits) -> Result<ToolOutput, Error> {
    let rel = checked_path(&args.path)?;
    let file = match open_regular(ws.dir(), &rel, &args.path)? {
        Ok(file) => file,
        Err(err) => return io_failure(&err, &args.path, "read"),
    };
    let meta = match file.metadata() {
        Ok(meta) => meta,
        Err(err) => return io_failure(&err, &args.path, "read"),
    };
    if meta.is_dir() {
        return Ok(ToolOutput::failed(format!(
            "cannot read `{}`: it is a directory (use fs.list)",
            args.path
        )));
    }
    let too_big = |size: u64| Error::LimitExceeded {
        limit: "max_file_bytes",
        message: format!(
            "`{}` is {size} bytes, over the worker's {}-byte file limit (HEIST_MAX_FILE_BYTES)",
            args.path, limits.max_file_bytes
        ),
    };
    if meta.len() > limits.max_file_bytes {
        return Err(too_big(meta.len()));
    }
    // The file may grow between fstat and read: read at most one byte past the limit.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    if let Err(err) = file
        .take(limits.max_file_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
    {
        return io_failure(&err, &args.path, "read");
    }
    let size = bytes.len() as u64;
    if size > limits.max_file_bytes {
        return Err(too_big(size));
    }
    let text = match args.encoding {
        Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(&bytes),
        Encoding::Utf8 => match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(_) => {
                return Ok(ToolOutput::failed(format!(
                    "cannot read `{}` as text: it is not valid UTF-8 (read it with encoding \"base64\")",
                    args.path
                )));
            }
        },
    };
    let mut info = Map::new();
    info.insert("path".to_owned(), json!(args.path));
    info.insert("size".to_owned(), json!(size));
    info.insert("encoding".to_owned(), json!(args.encoding.as_str()));
    Ok(ToolOutput {
        content: vec![Content::Text(text)],
        structured: Some(info),
        is_error: false,
    })
}
