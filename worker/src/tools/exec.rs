//! `exec`: runs a command in the session's sandbox, either an argv (no shell) or a shell
//! command line (`/bin/sh -c`), with an optional working directory inside the workspace, extra
//! environment, stdin and timeout. The result has the output as text blocks and
//! `{exit_code, signal, timed_out, duration_ms, cpu_ms, stdout, stderr, stdout_truncated,
//! stderr_truncated}` as structured content; `is_error` is set when the command exited
//! non-zero, was killed or timed out. On a streaming call the output also arrives live.
//!
//! Also the pieces run.python shares: resolving a path inside the workspace and turning a
//! [`Finished`] command into a [`ToolOutput`].

use std::{path::PathBuf, time::Duration};

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use super::{
    Content, Tool, ToolContext, ToolOutput,
    fs::{checked_path, is_escape},
    parse_args,
};
use crate::{
    Error,
    sandbox::{Finished, Request, validate_env},
    sessions::Workspace,
};

/// The exec tool.
pub(crate) struct Exec;

#[derive(Deserialize)]
struct Args {
    argv: Option<Vec<String>>,
    command: Option<String>,
    cwd: Option<String>,
    #[serde(default)]
    env: Map<String, Json>,
    #[serde(default)]
    stdin: String,
    timeout_s: Option<f64>,
}

impl Tool for Exec {
    fn name(&self) -> &'static str {
        "exec"
    }

    fn description(&self) -> &'static str {
        "Runs a command in the session's sandbox (its own namespaces; the filesystem limited to \
         the workspace and read-only system directories; no network). Give exactly one of argv \
         (program and arguments, no shell) or command (a shell command line for /bin/sh -c). \
         Returns stdout and stderr (capped), the exit code or signal, whether it timed out, and \
         the duration; is_error is true unless it exited with code 0."
    }

    fn input_schema(&self) -> Json {
        json!({
            "type": "object",
            "properties": {
                "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": "Program and arguments, run without a shell, e.g. [\"ls\", \"-la\"]."},
                "command": {"type": "string", "minLength": 1, "description": "A shell command line, run with /bin/sh -c."},
                "cwd": {"type": "string", "description": "Working directory relative to the workspace (default: its root)."},
                "env": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Extra environment variables."},
                "stdin": {"type": "string", "description": "Text written to the command's standard input."},
                "timeout_s": {"type": "number", "exclusiveMinimum": 0, "description": "Wall-clock timeout in seconds (default and maximum are set by the worker)."}
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
            let argv = match (args.argv, args.command) {
                (Some(argv), None) => argv,
                (None, Some(command)) => vec!["/bin/sh".to_owned(), "-c".to_owned(), command],
                (Some(_), Some(_)) | (None, None) => {
                    return Err(Error::InvalidArgument {
                        field: "argv".to_owned(),
                        message: "give exactly one of `argv` (e.g. [\"ls\", \"-la\"]) or \
                                  `command` (e.g. \"ls -la | wc -l\")"
                            .to_owned(),
                    });
                }
            };
            let cwd = match &args.cwd {
                Some(raw) => Some(resolve(&ctx.workspace, raw, "cwd", Want::Dir)?),
                None => None,
            };
            let request = Request {
                argv,
                cwd,
                env: validate_env(&args.env)?,
                stdin: args.stdin.into_bytes(),
                timeout: timeout(args.timeout_s),
                read_only: Vec::new(),
            };
            let finished = ctx
                .sandbox
                .run(&ctx.workspace, request, ctx.output.clone())
                .await?;
            Ok(output(&finished))
        })
    }
}

/// `timeout_s` as a duration (absurdly large values become "too long", caught by the quota).
pub(crate) fn timeout(seconds: Option<f64>) -> Option<Duration> {
    seconds.map(|s| Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX))
}

/// What a resolved path must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    /// A directory.
    Dir,
    /// A regular file.
    File,
}

/// Resolves `raw` (relative to the workspace, symlinks followed only while they stay inside)
/// to an absolute path of the wanted kind.
pub(crate) fn resolve(
    workspace: &Workspace,
    raw: &str,
    field: &str,
    want: Want,
) -> Result<PathBuf, Error> {
    let rel = checked_path(raw)?;
    let resolved = workspace.dir().canonicalize(&rel).map_err(|err| {
        if is_escape(&err) {
            Error::PathOutside {
                path: raw.to_owned(),
                why: "resolves outside the workspace (through `..` or a symlink)",
            }
        } else {
            Error::InvalidArgument {
                field: field.to_owned(),
                message: format!("`{raw}` does not exist in the workspace: {err}"),
            }
        }
    })?;
    let meta = workspace
        .dir()
        .metadata(&resolved)
        .map_err(|err| Error::InvalidArgument {
            field: field.to_owned(),
            message: format!("cannot read `{raw}`: {err}"),
        })?;
    let fits = match want {
        Want::Dir => meta.is_dir(),
        Want::File => meta.is_file(),
    };
    if !fits {
        let kind = match want {
            Want::Dir => "a directory",
            Want::File => "a regular file",
        };
        return Err(Error::InvalidArgument {
            field: field.to_owned(),
            message: format!("`{raw}` is not {kind} in the workspace"),
        });
    }
    Ok(workspace.path().join(resolved))
}

/// The tool result of a finished command.
pub(crate) fn output(finished: &Finished) -> ToolOutput {
    let stdout = String::from_utf8_lossy(&finished.stdout.data).into_owned();
    let stderr = String::from_utf8_lossy(&finished.stderr.data).into_owned();
    let mut structured = Map::new();
    structured.insert("exit_code".to_owned(), json!(finished.exit_code));
    structured.insert("signal".to_owned(), json!(finished.signal));
    structured.insert("timed_out".to_owned(), json!(finished.timed_out));
    structured.insert(
        "duration_ms".to_owned(),
        json!(u64::try_from(finished.duration.as_millis()).unwrap_or(u64::MAX)),
    );
    structured.insert("cpu_ms".to_owned(), json!(finished.cpu_ms));
    structured.insert(
        "stdout_truncated".to_owned(),
        json!(finished.stdout.truncated),
    );
    structured.insert(
        "stderr_truncated".to_owned(),
        json!(finished.stderr.truncated),
    );
    structured.insert("stdout".to_owned(), json!(stdout));
    structured.insert("stderr".to_owned(), json!(stderr));

    let mut content = Vec::new();
    if !stdout.is_empty() {
        content.push(Content::Text(stdout));
    }
    if !stderr.is_empty() {
        content.push(Content::Text(stderr));
    }
    let failed = finished.failed();
    if failed {
        content.push(Content::Text(summary(finished)));
    }
    ToolOutput {
        content,
        structured: Some(structured),
        is_error: failed,
    }
}

/// One line saying how a failed command ended.
fn summary(finished: &Finished) -> String {
    let how = match (finished.exit_code, finished.signal) {
        (_, Some(signal)) => format!("was killed by signal {signal}"),
        (Some(code), None) => format!("exited with code {code}"),
        (None, None) => "ended".to_owned(),
    };
    let mut line = format!("the command {how}");
    if finished.timed_out {
        line.push_str(&format!(
            " after timing out ({:.1} s)",
            finished.duration.as_secs_f64()
        ));
    }
    for (name, captured) in [("stdout", &finished.stdout), ("stderr", &finished.stderr)] {
        if captured.truncated {
            line.push_str(&format!(
                "; {name} was truncated to {} of {} bytes",
                captured.data.len(),
                captured.total
            ));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{super::test_support::*, *};
    use crate::sandbox::Captured;

    #[tokio::test]
    async fn refuses_both_or_neither_of_argv_and_command() {
        let (_tmp, ctx) = context();
        for args in [json!({}), json!({"argv": ["true"], "command": "true"})] {
            let err = run(&ctx, "exec", args).await.expect_err("refused");
            assert!(
                matches!(&err, Error::InvalidArgument { field, .. } if field == "argv"),
                "{err:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_disabled_sandbox_is_failed_precondition_saying_why() {
        let (_tmp, ctx) = context();
        let err = run(&ctx, "exec", json!({"command": "true"}))
            .await
            .expect_err("disabled");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            heist_proto::errors::reason_of(&status).as_deref(),
            Some(heist_proto::errors::reason::SANDBOX_UNAVAILABLE)
        );
        assert!(
            status.message().contains("--sandbox unconfined"),
            "{}",
            status.message()
        );
    }

    #[tokio::test]
    async fn cwd_must_stay_inside_and_be_a_directory() {
        let (_tmp, ctx) = context();
        std::fs::create_dir(ctx.workspace.path().join("sub")).expect("mkdir");
        std::fs::write(ctx.workspace.path().join("f"), b"x").expect("file");
        std::os::unix::fs::symlink("/", ctx.workspace.path().join("root")).expect("symlink");
        let ws = &ctx.workspace;
        assert_eq!(
            resolve(ws, "sub", "cwd", Want::Dir).expect("inside"),
            ws.path().join("sub")
        );
        for raw in ["../..", "/etc", "root", "root/etc"] {
            let err = resolve(ws, raw, "cwd", Want::Dir).expect_err(raw);
            assert!(matches!(err, Error::PathOutside { .. }), "{raw}: {err:?}");
        }
        for raw in ["f", "missing"] {
            let err = resolve(ws, raw, "cwd", Want::Dir).expect_err(raw);
            assert!(
                matches!(err, Error::InvalidArgument { .. }),
                "{raw}: {err:?}"
            );
        }
        assert!(resolve(ws, "f", "path", Want::File).is_ok());
    }

    #[test]
    fn results_carry_output_status_and_truncation() {
        let finished = Finished {
            exit_code: Some(3),
            duration: Duration::from_millis(12),
            stdout: Captured {
                data: b"out".to_vec(),
                truncated: true,
                total: 10,
            },
            ..Finished::default()
        };
        let out = output(&finished);
        assert!(out.is_error);
        assert_eq!(out.content.first(), Some(&Content::Text("out".to_owned())));
        let Some(Content::Text(last)) = out.content.last() else {
            panic!("summary block");
        };
        assert!(last.contains("exited with code 3"), "{last}");
        assert!(last.contains("truncated to 3 of 10 bytes"), "{last}");
        let s = Json::Object(out.structured.expect("structured"));
        assert_eq!(s["exit_code"], json!(3));
        assert_eq!(s["signal"], Json::Null);
        assert_eq!(s["stdout_truncated"], json!(true));
        assert_eq!(s["duration_ms"], json!(12));
        assert_eq!(s["stdout"], json!("out"));

        let ok = output(&Finished {
            exit_code: Some(0),
            ..Finished::default()
        });
        assert!(!ok.is_error && ok.content.is_empty());
    }

    #[test]
    fn timeouts_convert_without_panicking() {
        assert_eq!(timeout(Some(1.5)), Some(Duration::from_millis(1500)));
        assert_eq!(timeout(Some(1e300)), Some(Duration::MAX));
        assert_eq!(timeout(None), None);
    }
}
