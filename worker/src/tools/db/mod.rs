//! `db.query`: read-only SQL over a SQLite file in the session workspace.
//!
//! The file is opened through the workspace capability (the same confinement as the fs tools:
//! no absolute paths, no escape through `..` or symlinks), then SQLite reads it through
//! `/proc/self/fd/N` with `mode=ro&immutable=1`, so the path SQLite sees is the file already
//! opened beneath the workspace. Three more fences keep the query read-only and bounded:
//! - an authorizer callback allows only reads (SELECT, column reads, functions, recursive CTEs
//!   and read-only pragmas) and denies everything else, ATTACH included;
//! - `SQLITE_LIMIT_ATTACHED` is 0;
//! - a progress handler interrupts a statement that runs past [`DbLimits::time_limit_ms`] or whose
//!   call is cancelled; rows past [`DbLimits::max_rows`] and output past
//!   [`DbLimits::max_result_bytes`] stop the read and mark the result truncated.

use std::{
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use rusqlite::{
    Connection, OpenFlags,
    hooks::{AuthAction, AuthContext, Authorization},
    limits::Limit,
    types::ValueRef,
};
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use super::{
    Tool, ToolContext, ToolOutput,
    fs::{blocking, checked_path, io_failure},
    parse_args,
};
use crate::{Error, sessions::Workspace};

/// Bounds on one `db.query` call.
#[derive(Clone, Copy, Debug)]
pub struct DbLimits {
    /// Longest a statement may run, in milliseconds (default 2000).
    pub time_limit_ms: u64,
    /// Most rows returned (default 500); a query may ask for fewer with `max_rows`.
    pub max_rows: usize,
    /// Most bytes of cell data returned, counted as the JSON text of the rows (default 256 KiB).
    pub max_result_bytes: usize,
}

impl Default for DbLimits {
    fn default() -> Self {
        Self {
            time_limit_ms: 2_000,
            max_rows: 500,
            max_result_bytes: 256 * 1024,
        }
    }
}

/// The db.query tool.
pub struct DbQuery {
    limits: DbLimits,
}

impl DbQuery {
    /// A db.query tool with these limits.
    pub fn new(limits: DbLimits) -> Self {
        Self { limits }
    }
}

#[derive(Deserialize)]
struct Args {
    database: String,
    sql: String,
    #[serde(default)]
    max_rows: Option<usize>,
}

impl Tool for DbQuery {
    fn name(&self) -> &'static str {
        "db.query"
    }

    fn description(&self) -> &'static str {
        "Runs one read-only SQL statement against a SQLite database file in the session \
         workspace. Returns {columns, rows, row_count, truncated} as structured content. Writes, \
         ATTACH and pragma changes are refused; long statements are stopped."
    }

    fn input_schema(&self) -> Json {
        json!({
            "type": "object",
            "properties": {
                "database": {"type": "string", "minLength": 1, "description": "SQLite file path relative to the workspace, e.g. \"security.db\"."},
                "sql": {"type": "string", "minLength": 1, "maxLength": 10000, "description": "One SELECT (or WITH ... SELECT) statement."},
                "max_rows": {"type": "integer", "minimum": 1, "description": "Return at most this many rows (capped by the worker's limit)."}
            },
            "required": ["database", "sql"],
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
            let limits = self.limits;
            let cancelled = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&cancelled);
            let cancel = ctx.cancel.clone();
            let watcher = tokio::spawn(async move {
                cancel.cancelled().await;
                flag.store(true, Ordering::Relaxed);
            });
            let out = blocking(ctx, move |ws| query(ws, &args, limits, &cancelled)).await;
            watcher.abort();
            out
        })
    }
}

fn query(
    ws: &Workspace,
    args: &Args,
    limits: DbLimits,
    cancelled: &Arc<AtomicBool>,
) -> Result<ToolOutput, Error> {
    let rel = checked_path(&args.database)?;
    let file = match ws.dir().open(&rel) {
        Ok(file) => file,
        Err(err) => return io_failure(&err, &args.database, "open database"),
    };
    match file.metadata() {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => {
            return Ok(ToolOutput::failed(format!(
                "`{}` is not a regular file: db.query needs a SQLite database file",
                args.database
            )));
        }
        Err(err) => return io_failure(&err, &args.database, "open database"),
    }
    let uri = format!(
        "file:/proc/self/fd/{}?mode=ro&immutable=1",
        file.as_raw_fd()
    );
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = match Connection::open_with_flags(&uri, flags) {
        Ok(conn) => conn,
        Err(err) => {
            return Ok(ToolOutput::failed(format!(
                "cannot open `{}` as a SQLite database: {err}",
                args.database
            )));
        }
    };
    fence(&mut conn, limits, cancelled)?;
    let max_rows = args
        .max_rows
        .unwrap_or(limits.max_rows)
        .min(limits.max_rows);
    let result = run(&conn, &args.sql, max_rows, limits.max_result_bytes);
    drop(conn);
    drop(file);
    match result {
        Ok(out) => Ok(out),
        Err(err) => Ok(ToolOutput::failed(explain(&err, &args.sql, limits))),
    }
}

/// Installs the authorizer, the ATTACH limit and the time limit.
fn fence(
    conn: &mut Connection,
    limits: DbLimits,
    cancelled: &Arc<AtomicBool>,
) -> Result<(), Error> {
    let internal = |e: rusqlite::Error| Error::Internal(format!("configuring SQLite: {e}"));
    conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)
        .map_err(internal)?;
    conn.authorizer(Some(authorize)).map_err(internal)?;
    let deadline = Instant::now() + Duration::from_millis(limits.time_limit_ms);
    let cancelled = Arc::clone(cancelled);
    conn.progress_handler(
        1_000,
        Some(move || Instant::now() >= deadline || cancelled.load(Ordering::Relaxed)),
    )
    .map_err(internal)?;
    Ok(())
}

/// Fail closed: only what a read needs.
fn authorize(ctx: AuthContext<'_>) -> Authorization {
    match ctx.action {
        AuthAction::Select
        | AuthAction::Read { .. }
        | AuthAction::Function { .. }
        | AuthAction::Recursive => Authorization::Allow,
        // Reading a pragma (`PRAGMA table_info(x)`) is fine; setting one is not.
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } if pragma_value.is_none() || READ_PRAGMAS.contains(&pragma_name) => Authorization::Allow,
        _ => Authorization::Deny,
    }
}

/// Pragmas whose argument names a table rather than setting a value.
const READ_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "index_list",
    "index_info",
    "foreign_key_list",
];

fn run(
    conn: &Connection,
    sql: &str,
    max_rows: usize,
    max_bytes: usize,
) -> Result<ToolOutput, rusqlite::Error> {
    let mut stmt = conn.prepare(sql)?;
    if !stmt.readonly() {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_AUTH),
            Some("not authorized".to_owned()),
        ));
    }
    let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let width = columns.len();
    let mut rows_out = Vec::new();
    let mut bytes = 0usize;
    let mut truncated = None;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        if rows_out.len() >= max_rows {
            truncated = Some("max_rows");
            break;
        }
        let mut cells = Vec::with_capacity(width);
        for i in 0..width {
            cells.push(cell(row.get_ref(i)?));
        }
        let cells = Json::Array(cells);
        bytes += cells.to_string().len();
        if bytes > max_bytes {
            truncated = Some("max_result_bytes");
            break;
        }
        rows_out.push(cells);
    }
    let mut result = Map::new();
    result.insert("row_count".to_owned(), json!(rows_out.len()));
    result.insert("truncated".to_owned(), json!(truncated.is_some()));
    if let Some(limit) = truncated {
        result.insert("truncated_by".to_owned(), json!(limit));
    }
    result.insert("columns".to_owned(), json!(columns));
    result.insert("rows".to_owned(), Json::Array(rows_out));
    Ok(ToolOutput::object(result))
}

fn cell(value: ValueRef<'_>) -> Json {
    match value {
        ValueRef::Null => Json::Null,
        ValueRef::Integer(i) => json!(i),
        ValueRef::Real(f) => json!(f),
        ValueRef::Text(t) => json!(String::from_utf8_lossy(t)),
        ValueRef::Blob(b) => json!(format!("<blob of {} bytes>", b.len())),
    }
}

/// The message a model or user reads when the statement failed.
fn explain(err: &rusqlite::Error, sql: &str, limits: DbLimits) -> String {
    let code = err.sqlite_error_code();
    let upper = sql.trim_start().to_ascii_uppercase();
    match code {
        Some(rusqlite::ErrorCode::AuthorizationForStatementDenied)
        | Some(rusqlite::ErrorCode::ReadOnly) => {
            if upper.starts_with("ATTACH") {
                "ATTACH is refused: db.query reads only the one database file it was given"
                    .to_owned()
            } else {
                format!(
                    "db.query is read-only: only SELECT statements (and reading pragmas) are allowed; \
                     the statement was refused ({err})"
                )
            }
        }
        Some(rusqlite::ErrorCode::OperationInterrupted) => format!(
            "the statement was stopped after the {} ms time limit (or the call was cancelled): \
             narrow it with WHERE or LIMIT",
            limits.time_limit_ms
        ),
        _ if matches!(err, rusqlite::Error::MultipleStatement) => {
            "send one statement at a time".to_owned()
        }
        _ => format!("SQL error: {err}"),
    }
}

#[cfg(test)]
mod tests;
