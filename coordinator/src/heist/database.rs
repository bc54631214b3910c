//! The target's security database: a SQLite file built from a [`Scenario`], written into the
//! game's workspace where the crew reads it with `db.query`.

use rusqlite::{Connection, params};

use super::scenario::{Scenario, floor_slug};

/// The schema, one statement per table; columns are plain so a model can query them unaided.
const SCHEMA: &str = "
CREATE TABLE entrances (name TEXT PRIMARY KEY, floor INTEGER NOT NULL, post TEXT NOT NULL,
                        zone TEXT NOT NULL);
CREATE TABLE guards (id INTEGER PRIMARY KEY, name TEXT NOT NULL, post TEXT NOT NULL);
CREATE TABLE shifts (guard_id INTEGER NOT NULL REFERENCES guards(id), post TEXT NOT NULL,
                     start TEXT NOT NULL, end TEXT NOT NULL);
CREATE TABLE cameras (id TEXT PRIMARY KEY, floor INTEGER NOT NULL, covers TEXT NOT NULL,
                      offline_from TEXT, offline_to TEXT);
CREATE TABLE alarm_zones (zone TEXT PRIMARY KEY, floor INTEGER NOT NULL, sensor TEXT NOT NULL,
                          armed_from TEXT NOT NULL, armed_to TEXT NOT NULL);
CREATE TABLE vault (model TEXT NOT NULL, lock TEXT NOT NULL, floor INTEGER NOT NULL,
                    floor_name TEXT NOT NULL, drill_minutes INTEGER NOT NULL,
                    relock_minutes INTEGER NOT NULL);
CREATE TABLE patrol_routes (guard_id INTEGER NOT NULL REFERENCES guards(id), route TEXT NOT NULL,
                            every_minutes INTEGER NOT NULL, first_pass TEXT NOT NULL);
CREATE TABLE getaway_routes (name TEXT PRIMARY KEY, distance_km INTEGER NOT NULL,
                             speed_kmh INTEGER NOT NULL);
";

/// Builds the database and returns the file's bytes.
/// The database is built in memory and serialized: no temporary file.
pub fn build(scenario: &Scenario) -> Result<Vec<u8>, rusqlite::Error> {
    let mut db = Connection::open_in_memory()?;
    {
        db.execute_batch(SCHEMA)?;
        let tx = db.transaction()?;
        for e in &scenario.entrances {
            tx.execute(
                "INSERT INTO entrances VALUES (?1, ?2, ?3, ?4)",
                params![e.name, e.floor, e.post, e.zone],
            )?;
        }
        for g in &scenario.guards {
            tx.execute(
                "INSERT INTO guards VALUES (?1, ?2, ?3)",
                params![g.id, g.name, g.post],
            )?;
            tx.execute(
                "INSERT INTO shifts VALUES (?1, ?2, ?3, ?4)",
                params![g.id, g.post, g.start.hhmm(), g.end.hhmm()],
            )?;
        }
        for c in &scenario.cameras {
            tx.execute(
                "INSERT INTO cameras VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    c.id,
                    c.floor,
                    c.covers,
                    c.offline_from.map(|t| t.hhmm()),
                    c.offline_to.map(|t| t.hhmm())
                ],
            )?;
        }
        for z in &scenario.zones {
            tx.execute(
                "INSERT INTO alarm_zones VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    z.zone,
                    z.floor,
                    z.sensor,
                    z.armed_from.hhmm(),
                    z.armed_to.hhmm()
                ],
            )?;
        }
        let v = &scenario.vault;
        tx.execute(
            "INSERT INTO vault VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                v.model,
                v.lock,
                v.floor,
                floor_slug(v.floor),
                v.drill_minutes,
                v.relock_minutes
            ],
        )?;
        for p in &scenario.patrols {
            tx.execute(
                "INSERT INTO patrol_routes VALUES (?1, ?2, ?3, ?4)",
                params![p.guard_id, p.route, p.every_minutes, p.first_pass.hhmm()],
            )?;
        }
        for r in &scenario.routes {
            tx.execute(
                "INSERT INTO getaway_routes VALUES (?1, ?2, ?3)",
                params![r.name, r.distance_km, r.speed_kmh],
            )?;
        }
        tx.commit()?;
    }
    Ok(db.serialize("main")?.to_vec())
}
