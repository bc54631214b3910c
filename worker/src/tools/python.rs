//! `run.python`: runs Python code (or a `.py` file of the workspace) in the session's sandbox
//! with the worker's interpreter. Code is written to a private temporary directory outside the
//! workspace (readable by the command, removed afterwards) and run as a script, with the
//! workspace on PYTHONPATH so it can import the session's modules. Same result as `exec`.

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::{
    Tool, ToolContext, ToolOutput,
    exec::{Want, output, resolve, timeout},
    parse_args,
};
use crate::{Error, sandbox::Request};

/// The run.python tool.
pub(crate) struct RunPython;

#[derive(Deserialize)]
struct Args {
    code: Option<String>,
    path: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    stdin: String,
    timeout_s: Option<f64>,
}

impl Tool for RunPython {
    fn name(&self) -> &'static str {
        "run.python"
    }

    fn description(&self) -> &'static str {
        "Runs Python 3 in the session's sandbox: give exactly one of code (the program text) or \
         path (a .py file in the workspace), plus optional args, stdin and timeout_s. The \
         working directory is the workspace root, which is also on PYTHONPATH. Returns stdout, \
         stderr, the exit code and the duration like exec."
    }

    fn input_schema(&self) -> Json {
        json!({
            "type": "object",
            "properties": {
                "code": {"type": "string", "minLength": 1, "description": "Python source to run."},
                "path": {"type": "string", "minLength": 1, "description": "A Python file in the workspace to run."},
                "args": {"type": "array", "items": {"type": "string"}, "description": "Arguments (sys.argv[1:])."},
                "stdin": {"type": "string", "description": "Text written to standard input."},
                "timeout_s": {"type": "number", "exclusiveMinimum": 0, "description": "Wall-clock timeout in seconds."}
            },
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
            let python = ctx.sandbox.python()?;
            let root = ctx.workspace.path().display().to_string();
            // Holds the code file until the command is done; removed on drop.
            let mut code_dir = None;
            let script = match (args.code, args.path) {
                (Some(code), None) => {
                    // Code is input like stdin, and bounded by the same quota.
                    let limit = ctx.sandbox.quotas().stdin_bytes;
                    if code.len() as u64 > limit {
                        return Err(Error::LimitExceeded {
                            limit: "stdin_bytes",
                            message: format!(
                                "code is {} bytes, over the {limit}-byte quota \
                                 (HEIST_QUOTA_STDIN_BYTES): write it to a file with fs.write \
                                 and pass its path",
                                code.len()
                            ),
                        });
                    }
                    let dir = tempfile::Builder::new()
                        .prefix("heist-run-")
                        .tempdir()
                        .map_err(|e| Error::io("cannot create a directory for the code", e))?;
                    let file = dir.path().join("main.py");
                    std::fs::write(&file, code)
                        .map_err(|e| Error::io("cannot write the code file", e))?;
                    code_dir = Some(dir);
                    file
                }
                (None, Some(path)) => resolve(&ctx.workspace, &path, "path", Want::File)?,
                (Some(_), Some(_)) | (None, None) => {
                    return Err(Error::InvalidArgument {
                        field: "code".to_owned(),
                        message: "give exactly one of `code` (Python source) or `path` (a .py \
                                  file in the workspace)"
                            .to_owned(),
                    });
                }
            };
            let mut argv = vec![
                python.executable.display().to_string(),
                script.display().to_string(),
            ];
            argv.extend(args.args);
            let request = Request {
                argv,
                cwd: None,
                env: vec![("PYTHONPATH".to_owned(), root)],
                stdin: args.stdin.into_bytes(),
                timeout: timeout(args.timeout_s),
                read_only: code_dir.iter().map(|d| d.path().to_path_buf()).collect(),
            };
            let finished = ctx
                .sandbox
                .run(&ctx.workspace, request, ctx.output.clone())
                .await;
            drop(code_dir);
            Ok(output(&finished?))
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::test_support::*;
    use crate::Error;

    #[tokio::test]
    async fn without_an_interpreter_it_says_so() {
        let (_tmp, ctx) = context();
        let err = run(&ctx, "run.python", json!({"code": "print(1)"}))
            .await
            .expect_err("no python in unit tests");
        assert!(
            matches!(
                err,
                Error::SandboxUnavailable {
                    missing: "python",
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
