use serde_json::json;

use super::*;
use crate::tools::test_support::{context, text};

/// A workspace holding `security.db` with a guards table, and its context.
fn with_db() -> (tempfile::TempDir, ToolContext) {
    let (tmp, ctx) = context();
    let conn = Connection::open(ctx.workspace.path().join("security.db")).expect("create db");
    conn.execute_batch(
        "CREATE TABLE guards (name TEXT, shift_start TEXT, zone TEXT);
         INSERT INTO guards VALUES ('Ada', '22:00', 'vault'), ('Bo', '06:00', 'lobby');",
    )
    .expect("seed db");
    (tmp, ctx)
}

async fn query(ctx: &ToolContext, sql: &str) -> Result<ToolOutput, Error> {
    DbQuery::new(DbLimits {
        time_limit_ms: 200,
        max_rows: 50,
        max_result_bytes: 4096,
    })
    .call(ctx, json!({"database": "security.db", "sql": sql}))
    .await
}

#[tokio::test]
async fn select_returns_columns_and_rows() {
    let (_tmp, ctx) = with_db();
    let out = query(
        &ctx,
        "SELECT name, shift_start FROM guards WHERE zone = 'vault'",
    )
    .await
    .expect("query");
    assert!(!out.is_error, "{out:?}");
    let s = out.structured.expect("structured");
    assert_eq!(s["columns"], json!(["name", "shift_start"]));
    assert_eq!(s["rows"], json!([["Ada", "22:00"]]));
    assert_eq!(s["truncated"], json!(false));
}

#[tokio::test]
async fn writes_are_refused_and_change_nothing() {
    let (_tmp, ctx) = with_db();
    for sql in [
        "DELETE FROM guards",
        "UPDATE guards SET shift_start = '00:00'",
        "CREATE TABLE x (a)",
        "PRAGMA user_version = 5",
    ] {
        let out = query(&ctx, sql).await.expect("tool ran");
        assert!(out.is_error, "{sql} was not refused");
        assert!(text(&out).contains("read-only"), "{sql}: {}", text(&out));
    }
    let out = query(&ctx, "SELECT count(*) FROM guards")
        .await
        .expect("count");
    assert_eq!(out.structured.expect("s")["rows"], json!([[2]]));
}

#[tokio::test]
async fn attach_of_a_file_outside_is_refused() {
    let (tmp, ctx) = with_db();
    let outside = tmp.path().join("outside.db");
    Connection::open(&outside)
        .and_then(|c| c.execute_batch("CREATE TABLE secret (s TEXT)"))
        .expect("outside db");
    let sql = format!("ATTACH DATABASE '{}' AS other", outside.display());
    let out = query(&ctx, &sql).await.expect("tool ran");
    assert!(out.is_error);
    assert!(text(&out).contains("ATTACH is refused"), "{}", text(&out));
}

#[tokio::test]
async fn a_query_that_never_ends_is_stopped() {
    let (_tmp, ctx) = with_db();
    let out = query(
        &ctx,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n",
    )
    .await
    .expect("tool ran");
    assert!(out.is_error);
    assert!(text(&out).contains("200 ms time limit"), "{}", text(&out));
}

#[tokio::test]
async fn a_huge_result_is_truncated_at_the_limits() {
    let (_tmp, ctx) = with_db();
    let out = query(
        &ctx,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 100000) SELECT i FROM n",
    )
    .await
    .expect("query");
    let s = out.structured.expect("structured");
    assert_eq!(s["row_count"], json!(50));
    assert_eq!(s["truncated_by"], json!("max_rows"));

    // 40 rows of 300 characters each: over 4096 bytes long before the row limit.
    let out = query(
        &ctx,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 40) SELECT hex(randomblob(150)) FROM n",
    )
    .await
    .expect("query");
    let s = out.structured.expect("structured");
    assert_eq!(s["truncated_by"], json!("max_result_bytes"));
    let rows = s["row_count"].as_u64().expect("count");
    assert!(rows > 0 && rows < 40, "{rows}");
}

#[tokio::test]
async fn a_database_outside_the_workspace_is_refused() {
    let (_tmp, ctx) = with_db();
    let err = DbQuery::new(DbLimits::default())
        .call(
            &ctx,
            json!({"database": "../outside.db", "sql": "SELECT 1"}),
        )
        .await
        .expect_err("outside");
    assert!(matches!(err, Error::PathOutside { .. }), "{err:?}");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_an_error_result() {
    let (_tmp, ctx) = with_db();
    std::fs::write(ctx.workspace.path().join("notes.txt"), "hello").expect("write");
    let out = DbQuery::new(DbLimits::default())
        .call(
            &ctx,
            json!({"database": "notes.txt", "sql": "SELECT 1 FROM guards"}),
        )
        .await
        .expect("tool ran");
    assert!(out.is_error);
}
