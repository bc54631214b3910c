//! fs.* behaviour and confinement: traversal, absolute paths, NUL bytes, symlinks in and out,
//! hard links, limits.

use std::{os::unix::fs::symlink, path::Path};

use serde_json::{Value as Json, json};

use super::rfc3339;
use crate::{
    Error,
    tools::{
        ToolContext, ToolOutput,
        test_support::{context, run, text},
    },
};

fn ws(ctx: &ToolContext) -> &Path {
    ctx.workspace.path()
}

async fn ok(ctx: &ToolContext, tool: &str, args: Json) -> ToolOutput {
    let out = run(ctx, tool, args.clone())
        .await
        .unwrap_or_else(|e| panic!("{tool} {args}: {e}"));
    assert!(!out.is_error, "{tool} {args}: {out:?}");
    out
}

async fn tool_error(ctx: &ToolContext, tool: &str, args: Json) -> String {
    let out = run(ctx, tool, args.clone())
        .await
        .unwrap_or_else(|e| panic!("{tool} {args}: {e}"));
    assert!(
        out.is_error,
        "{tool} {args}: expected is_error, got {out:?}"
    );
    text(&out).to_owned()
}

async fn refused(ctx: &ToolContext, tool: &str, args: Json) -> Error {
    match run(ctx, tool, args.clone()).await {
        Ok(out) => panic!("{tool} {args}: expected a refusal, got {out:?}"),
        Err(err) => err,
    }
}

async fn outside(ctx: &ToolContext, tool: &str, args: Json) {
    let err = refused(ctx, tool, args.clone()).await;
    assert!(
        matches!(err, Error::PathOutside { .. }),
        "{tool} {args}: {err:?}"
    );
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

fn structured(out: &ToolOutput) -> Json {
    Json::Object(out.structured.clone().expect("structured"))
}

#[tokio::test]
async fn write_then_read_round_trips() {
    let (_tmp, ctx) = context();
    let out = ok(
        &ctx,
        "fs.write",
        json!({"path": "notes/a.txt", "content": "héllo"}),
    )
    .await;
    assert_eq!(structured(&out)["size"], json!(6));
    let out = ok(&ctx, "fs.read", json!({"path": "notes/a.txt"})).await;
    assert_eq!(text(&out), "héllo");
    assert_eq!(
        structured(&out),
        json!({"path": "notes/a.txt", "size": 6, "encoding": "utf8"})
    );

    ok(
        &ctx,
        "fs.write",
        json!({"path": "bin", "content": "AP8=", "encoding": "base64"}),
    )
    .await;
    assert_eq!(
        std::fs::read(ws(&ctx).join("bin")).expect("read"),
        [0u8, 255]
    );
    let message = tool_error(&ctx, "fs.read", json!({"path": "bin"})).await;
    assert!(message.contains("encoding \"base64\""), "{message}");
    let out = ok(
        &ctx,
        "fs.read",
        json!({"path": "bin", "encoding": "base64"}),
    )
    .await;
    assert_eq!(text(&out), "AP8=");

    let err = refused(
        &ctx,
        "fs.write",
        json!({"path": "x", "content": "!!", "encoding": "base64"}),
    )
    .await;
    assert!(
        matches!(err, Error::InvalidArgument { ref field, .. } if field == "content"),
        "{err:?}"
    );
}

#[tokio::test]
async fn write_replaces_atomically_and_appends() {
    let (_tmp, ctx) = context();
    ok(&ctx, "fs.write", json!({"path": "f", "content": "one"})).await;
    ok(&ctx, "fs.write", json!({"path": "f", "content": "two"})).await;
    let out = ok(
        &ctx,
        "fs.write",
        json!({"path": "f", "content": "+3", "append": true}),
    )
    .await;
    assert_eq!(structured(&out)["size"], json!(5));
    assert_eq!(
        std::fs::read_to_string(ws(&ctx).join("f")).expect("read"),
        "two+3"
    );
    // No temp files are left behind.
    let names: Vec<_> = std::fs::read_dir(ws(&ctx))
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["f"]);

    let message = tool_error(
        &ctx,
        "fs.write",
        json!({"path": "new/dir/f", "content": "x", "create_parents": false}),
    )
    .await;
    assert!(message.contains("create_parents"), "{message}");
    assert!(!ws(&ctx).join("new").exists());
    let message = tool_error(
        &ctx,
        "fs.write",
        json!({"path": "f/under-a-file", "content": "x"}),
    )
    .await;
    assert!(message.starts_with("cannot"), "{message}");
}

#[tokio::test]
async fn size_limits_leave_files_untouched() {
    let (_tmp, ctx) = context(); // max_file_bytes = 1024
    let big = "x".repeat(1025);
    let err = refused(&ctx, "fs.write", json!({"path": "big", "content": big})).await;
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(!ws(&ctx).join("big").exists());

    ok(
        &ctx,
        "fs.write",
        json!({"path": "f", "content": "x".repeat(1000)}),
    )
    .await;
    let err = refused(
        &ctx,
        "fs.write",
        json!({"path": "f", "content": "y".repeat(100), "append": true}),
    )
    .await;
    assert!(matches!(err, Error::LimitExceeded { .. }), "{err:?}");
    assert_eq!(std::fs::read(ws(&ctx).join("f")).expect("read").len(), 1000);

    std::fs::write(ws(&ctx).join("huge"), vec![b'z'; 2000]).expect("write");
    let err = refused(&ctx, "fs.read", json!({"path": "huge"})).await;
    assert!(matches!(err, Error::LimitExceeded { .. }), "{err:?}");
}

#[tokio::test]
async fn failures_are_is_error_results() {
    let (_tmp, ctx) = context();
    let message = tool_error(&ctx, "fs.read", json!({"path": "missing.txt"})).await;
    assert_eq!(
        message,
        "cannot read `missing.txt`: no such file or directory"
    );
    std::fs::create_dir(ws(&ctx).join("d")).expect("mkdir");
    let message = tool_error(&ctx, "fs.read", json!({"path": "d"})).await;
    assert!(message.contains("is a directory"), "{message}");
    let message = tool_error(&ctx, "fs.stat", json!({"path": "nope"})).await;
    assert!(message.contains("no such file"), "{message}");
    let message = tool_error(&ctx, "fs.list", json!({"path": "nope"})).await;
    assert!(message.contains("no such file"), "{message}");
    std::fs::write(ws(&ctx).join("file"), b"x").expect("write");
    let message = tool_error(&ctx, "fs.list", json!({"path": "file"})).await;
    assert!(message.contains("not a directory"), "{message}");
    let message = tool_error(&ctx, "fs.delete", json!({"path": "nope"})).await;
    assert!(message.contains("no such file"), "{message}");
}

#[tokio::test]
async fn traversal_absolute_and_nul_are_refused() {
    let (_tmp, ctx) = context();
    std::fs::create_dir(ws(&ctx).join("sub")).expect("mkdir");
    for path in [
        "/etc/passwd",
        "../x",
        "sub/../../x",
        "..",
        "a\0b",
        "./../ws/x",
    ] {
        for tool in ["fs.read", "fs.stat", "fs.delete"] {
            outside(&ctx, tool, json!({"path": path})).await;
        }
        outside(&ctx, "fs.list", json!({"path": path})).await;
        outside(&ctx, "fs.write", json!({"path": path, "content": "x"})).await;
    }
    let err = refused(&ctx, "fs.read", json!({"path": "../secret"})).await;
    let status = tonic::Status::from(err);
    assert_eq!(
        heist_proto::errors::reason_of(&status).as_deref(),
        Some(heist_proto::errors::reason::PATH_OUTSIDE_WORKSPACE)
    );
    assert_eq!(
        heist_proto::errors::metadata_of(&status, "path").as_deref(),
        Some("../secret")
    );
    // `..` that stays inside is fine.
    ok(
        &ctx,
        "fs.write",
        json!({"path": "sub/../inside.txt", "content": "x"}),
    )
    .await;
    assert!(ws(&ctx).join("inside.txt").exists());
}

#[tokio::test]
async fn symlinks_out_are_refused_and_in_are_followed() {
    let (tmp, ctx) = context();
    let secret = tmp.path().join("secret.txt");
    std::fs::write(&secret, b"top secret").expect("secret");
    let root = ws(&ctx);
    symlink("/", root.join("to-root")).expect("symlink");
    symlink("../..", root.join("up-up")).expect("symlink");
    symlink(&secret, root.join("abs-secret")).expect("symlink");
    symlink("../secret.txt", root.join("rel-secret")).expect("symlink");
    std::fs::create_dir(root.join("real")).expect("mkdir");
    std::fs::write(root.join("real/data.txt"), b"inside").expect("write");
    symlink("real/data.txt", root.join("good-link")).expect("symlink");
    symlink("real", root.join("good-dir")).expect("symlink");

    for path in [
        "to-root/etc/passwd",
        "up-up/etc/passwd",
        "abs-secret",
        "rel-secret",
    ] {
        outside(&ctx, "fs.read", json!({"path": path})).await;
        outside(&ctx, "fs.write", json!({"path": path, "content": "pwned"})).await;
        outside(
            &ctx,
            "fs.write",
            json!({"path": path, "content": "pwned", "append": true}),
        )
        .await;
    }
    outside(&ctx, "fs.list", json!({"path": "to-root"})).await;
    outside(&ctx, "fs.list", json!({"path": "up-up"})).await;
    outside(
        &ctx,
        "fs.write",
        json!({"path": "to-root/tmp/x", "content": "x"}),
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(&secret).expect("secret"),
        "top secret"
    );

    // stat describes the link itself, without following it.
    let out = ok(&ctx, "fs.stat", json!({"path": "abs-secret"})).await;
    assert_eq!(structured(&out)["type"], json!("symlink"));
    assert_eq!(
        structured(&out)["target"],
        json!(secret.display().to_string())
    );

    // Links that stay inside work, and writing through one changes the target, not the link.
    let out = ok(&ctx, "fs.read", json!({"path": "good-link"})).await;
    assert_eq!(text(&out), "inside");
    ok(
        &ctx,
        "fs.write",
        json!({"path": "good-link", "content": "changed"}),
    )
    .await;
    assert!(
        std::fs::symlink_metadata(root.join("good-link"))
            .expect("meta")
            .is_symlink()
    );
    assert_eq!(
        std::fs::read_to_string(root.join("real/data.txt")).expect("read"),
        "changed"
    );
    ok(
        &ctx,
        "fs.write",
        json!({"path": "good-dir/new.txt", "content": "n"}),
    )
    .await;
    assert!(root.join("real/new.txt").exists());
    let out = ok(&ctx, "fs.list", json!({"path": "good-dir"})).await;
    let paths: Vec<_> = structured(&out)["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["path"].clone())
        .collect();
    assert_eq!(paths, [json!("real/data.txt"), json!("real/new.txt")]);

    // Deleting a link removes the link, never its target.
    ok(&ctx, "fs.delete", json!({"path": "abs-secret"})).await;
    ok(
        &ctx,
        "fs.delete",
        json!({"path": "to-root", "recursive": true}),
    )
    .await;
    assert!(secret.exists());
    assert!(Path::new("/etc").exists());
}

#[tokio::test]
async fn hard_links_to_outside_files_are_not_written_through() {
    let (tmp, ctx) = context();
    let outside_file = tmp.path().join("outside.txt");
    std::fs::write(&outside_file, b"original").expect("outside");
    let link = ws(&ctx).join("hard");
    std::fs::hard_link(&outside_file, &link).expect("hard link");

    // Appending would write through the shared inode: refused.
    let message = tool_error(
        &ctx,
        "fs.write",
        json!({"path": "hard", "content": "x", "append": true}),
    )
    .await;
    assert!(message.contains("hard links"), "{message}");
    assert_eq!(
        std::fs::read_to_string(&outside_file).expect("read"),
        "original"
    );

    // A replacing write swaps the directory entry: the outside file keeps its content.
    ok(
        &ctx,
        "fs.write",
        json!({"path": "hard", "content": "replaced"}),
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(&outside_file).expect("read"),
        "original"
    );
    assert_eq!(std::fs::read_to_string(&link).expect("read"), "replaced");

    // Documented: reading a planted hard link returns its content (cap-std cannot see it).
    std::fs::hard_link(&outside_file, ws(&ctx).join("hard2")).expect("hard link");
    assert_eq!(
        text(&ok(&ctx, "fs.read", json!({"path": "hard2"})).await),
        "original"
    );
}

#[tokio::test]
async fn list_reports_entries_and_truncates() {
    let (_tmp, ctx) = context(); // max_list_entries = 100
    let root = ws(&ctx);
    std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
    std::fs::write(root.join("a/b/c.txt"), b"abc").expect("write");
    std::fs::write(root.join("top.txt"), b"t").expect("write");
    symlink("a", root.join("link-to-a")).expect("symlink");

    let out = ok(&ctx, "fs.list", json!({})).await;
    let entries = structured(&out)["entries"].clone();
    let summary: Vec<_> = entries
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| (e["path"].clone(), e["type"].clone()))
        .collect();
    assert_eq!(
        summary,
        [
            (json!("a"), json!("dir")),
            (json!("link-to-a"), json!("symlink")),
            (json!("top.txt"), json!("file")),
        ]
    );
    assert_eq!(structured(&out)["truncated"], json!(false));

    let out = ok(&ctx, "fs.list", json!({"path": ".", "recursive": true})).await;
    let paths: Vec<_> = structured(&out)["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["path"].as_str().expect("path").to_owned())
        .collect();
    assert_eq!(
        paths,
        ["a", "a/b", "a/b/c.txt", "link-to-a", "top.txt"],
        "symlinks are not descended into"
    );
    let file = &structured(&out)["entries"][2];
    assert_eq!(file["size"], json!(3));
    assert!(file["mode"].as_str().expect("mode").starts_with('0'));

    for i in 0..150 {
        std::fs::write(root.join(format!("many-{i:03}")), b"").expect("write");
    }
    let out = ok(&ctx, "fs.list", json!({"recursive": true})).await;
    assert_eq!(structured(&out)["truncated"], json!(true));
    assert_eq!(
        structured(&out)["entries"]
            .as_array()
            .expect("entries")
            .len(),
        100
    );
    assert!(out.content.len() == 2, "a text block says it was truncated");
}

#[tokio::test]
async fn stat_describes_files() {
    let (_tmp, ctx) = context();
    ok(
        &ctx,
        "fs.write",
        json!({"path": "f.txt", "content": "12345"}),
    )
    .await;
    let out = ok(&ctx, "fs.stat", json!({"path": "f.txt"})).await;
    let info = structured(&out);
    assert_eq!(info["type"], json!("file"));
    assert_eq!(info["size"], json!(5));
    let modified = info["modified"].as_str().expect("modified");
    assert!(
        modified.ends_with('Z') && modified.len() == 20,
        "{modified}"
    );
    assert!(info["modified_unix"].as_i64().expect("unix") > 1_600_000_000);
    let out = ok(&ctx, "fs.stat", json!({"path": "."})).await;
    assert_eq!(structured(&out)["type"], json!("dir"));
}

#[tokio::test]
async fn delete_files_dirs_and_never_the_root() {
    let (_tmp, ctx) = context();
    let root = ws(&ctx);
    std::fs::create_dir_all(root.join("d/e")).expect("mkdir");
    std::fs::write(root.join("d/e/f"), b"x").expect("write");
    std::fs::write(root.join("g"), b"x").expect("write");
    std::fs::create_dir(root.join("empty")).expect("mkdir");
    symlink(".", root.join("self")).expect("symlink");

    ok(&ctx, "fs.delete", json!({"path": "g"})).await;
    ok(&ctx, "fs.delete", json!({"path": "empty"})).await;
    let message = tool_error(&ctx, "fs.delete", json!({"path": "d"})).await;
    assert!(message.contains("recursive: true"), "{message}");
    let out = ok(&ctx, "fs.delete", json!({"path": "d", "recursive": true})).await;
    assert_eq!(structured(&out)["deleted"], json!("dir"));
    assert!(!root.join("d").exists());

    std::fs::create_dir_all(root.join("sub")).expect("mkdir");
    for path in [".", "./", "sub/.."] {
        let err = refused(&ctx, "fs.delete", json!({"path": path, "recursive": true})).await;
        assert!(
            matches!(err, Error::InvalidArgument { .. }),
            "{path}: {err:?}"
        );
    }
    // A trailing slash on a link to the root: the link is not followed for deletion, and
    // removing it as a file fails; either way nothing under the root is touched.
    let result = run(
        &ctx,
        "fs.delete",
        json!({"path": "self/", "recursive": true}),
    )
    .await;
    assert!(
        result.as_ref().map_or(true, |out| out.is_error),
        "{result:?}"
    );
    assert!(root.exists());
    assert!(
        root.join("sub").exists(),
        "nothing was deleted through the root"
    );
}

#[test]
fn formats_rfc3339() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
}

#[tokio::test]
async fn fifos_and_sockets_are_refused_without_blocking() {
    let (_tmp, ctx) = context();
    let root = ws(&ctx).to_path_buf();
    nix::unistd::mkfifo(
        &root.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .expect("mkfifo");
    let _listener =
        std::os::unix::net::UnixListener::bind(root.join("sock")).expect("bind a socket");
    std::fs::write(root.join("plain.txt"), b"fine").expect("plain");
    std::os::unix::fs::symlink("pipe", root.join("to-pipe")).expect("symlink");

    for (path, kind) in [("pipe", "fifo"), ("to-pipe", "fifo"), ("sock", "socket")] {
        for args in [
            json!({"path": path}),
            json!({"path": path, "content": "x", "append": true}),
            json!({"path": path, "content": "x"}),
        ] {
            let tool = if args.get("content").is_some() {
                "fs.write"
            } else {
                "fs.read"
            };
            let err = refused(&ctx, tool, args.clone()).await;
            assert!(
                matches!(&err, Error::NotRegularFile { kind: k, .. } if *k == kind),
                "{tool} {args}: {err:?}"
            );
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), tonic::Code::FailedPrecondition);
            assert_eq!(
                heist_proto::errors::reason_of(&status).as_deref(),
                Some(heist_proto::errors::reason::NOT_A_REGULAR_FILE)
            );
        }
    }
    let out = ok(&ctx, "fs.read", json!({"path": "plain.txt"})).await;
    assert_eq!(text(&out), "fine");
    // fs.delete still removes them.
    ok(&ctx, "fs.delete", json!({"path": "pipe"})).await;
}
