//! `heistctl audit ls|tail|verify`: the coordinator's audit log (needs the audit:read scope).

use heist_proto::v1;
use serde::Serialize;

use crate::{
    cli::Context,
    error::{EXIT_ERROR, EXIT_OK, Error},
    output::{self, Format},
};

/// Verbs of `audit`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Records in order, filtered; every page unless --limit.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Records as they are written, until Ctrl-C.
    Tail(TailArgs),
    /// Check the hash chain; exit 1 naming the first broken record when it was tampered with.
    Verify,
}

/// Which records.
#[derive(Debug, Clone, clap::Args)]
pub struct FilterArgs {
    /// Kind, exactly (`token.refused`) or a prefix ending in a dot (`token.`).
    #[arg(long)]
    pub kind: Option<String>,
    /// Subject (client id, worker id), exactly.
    #[arg(long)]
    pub subject: Option<String>,
}

impl FilterArgs {
    fn filter(&self) -> v1::AuditFilter {
        v1::AuditFilter {
            kind: self.kind.clone().unwrap_or_default(),
            subject: self.subject.clone().unwrap_or_default(),
        }
    }
}

/// Flags of `audit ls`.
#[derive(Debug, clap::Args)]
pub struct LsArgs {
    /// Which records.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Only records after this sequence number.
    #[arg(long, default_value_t = 0)]
    pub after: u64,
    /// At most this many records (default: all).
    #[arg(long)]
    pub limit: Option<u32>,
}

/// Flags of `audit tail`.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// Which records.
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Start with the first record instead of only new ones.
    #[arg(long)]
    pub from_start: bool,
}

/// A record as printed.
#[derive(Debug, Serialize)]
struct EntryView {
    seq: u64,
    at: Option<String>,
    kind: String,
    subject: String,
    detail: String,
    hash: String,
}

impl From<v1::AuditEntry> for EntryView {
    fn from(e: v1::AuditEntry) -> Self {
        Self {
            seq: e.seq,
            at: e.at.map(|t| t.to_string()),
            kind: e.kind,
            subject: e.subject,
            detail: e.detail,
            hash: e.hash,
        }
    }
}

/// One line per record: `seq at kind subject detail`.
fn line(e: &EntryView) -> String {
    let subject = if e.subject.is_empty() {
        "-"
    } else {
        &e.subject
    };
    format!(
        "{:>6}  {}  {:<16} {:<20} {}\n",
        e.seq,
        e.at.as_deref().unwrap_or("-"),
        e.kind,
        subject,
        e.detail
    )
}

/// Runs an `audit` verb.
pub async fn run(ctx: &Context, cmd: Command) -> Result<u8, Error> {
    let client = ctx.client().await?;
    match cmd {
        Command::Ls(args) => {
            let mut entries = Vec::new();
            let mut after = args.after;
            let want = args.limit.map(|n| n as usize);
            loop {
                let left = want.map_or(1000, |w| w.saturating_sub(entries.len()).min(1000));
                if left == 0 {
                    break;
                }
                let page = client
                    .list_audit(
                        after,
                        u32::try_from(left).unwrap_or(1000),
                        args.filter.filter(),
                    )
                    .await?;
                entries.extend(page.entries.into_iter().map(EntryView::from));
                if page.next_after_seq == 0 {
                    break;
                }
                after = page.next_after_seq;
            }
            let mut out = std::io::stdout().lock();
            match ctx.format() {
                Format::Json => output::write_json(&mut out, &entries)?,
                Format::Table => {
                    let text: String = entries.iter().map(line).collect();
                    output::write_text(&mut out, &text)?;
                }
            }
            Ok(EXIT_OK)
        }
        Command::Tail(args) => {
            let mut stream = client
                .tail_audit(0, args.from_start, args.filter.filter())
                .await?;
            while let Some(entry) = stream.message().await? {
                let view = EntryView::from(entry);
                let mut out = std::io::stdout().lock();
                match ctx.format() {
                    Format::Json => output::write_json_line(&mut out, &view)?,
                    Format::Table => output::write_text(&mut out, &line(&view))?,
                }
            }
            Ok(EXIT_OK)
        }
        Command::Verify => {
            let verdict = client.verify_audit().await?;
            let mut out = std::io::stdout().lock();
            match ctx.format() {
                Format::Json => output::write_json(
                    &mut out,
                    &serde_json::json!({
                        "intact": verdict.intact,
                        "records": verdict.records,
                        "broken_at_seq": (!verdict.intact).then_some(verdict.broken_at_seq),
                        "reason": (!verdict.intact).then_some(&verdict.reason),
                    }),
                )?,
                Format::Table if verdict.intact => output::write_text(
                    &mut out,
                    &format!("audit log intact: {} records\n", verdict.records),
                )?,
                Format::Table => output::write_text(
                    &mut out,
                    &format!(
                        "audit log BROKEN at record {}: {} ({} records before it check out)\n",
                        verdict.broken_at_seq, verdict.reason, verdict.records
                    ),
                )?,
            }
            Ok(if verdict.intact { EXIT_OK } else { EXIT_ERROR })
        }
    }
}
