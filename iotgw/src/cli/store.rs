//! Where `iotgw device` reads and writes the registry: the gateway directory's `devices.db`, or
//! a PostgreSQL table (`--registry-url`) shared by a cluster. Each open makes sure the schema is
//! complete (SQLite: the optional columns; PostgreSQL: the table, the optional columns and the
//! NOTIFY trigger the plugins follow), like `iotgw registry init` does explicitly.

use super::gwdir::{GwDir, Result};
use rusqlite::{params, OptionalExtension};
use secure_iot_gateway::config::redact_url;
use secure_iot_gateway::registry::pg;
use std::time::Duration;

/// One registry row, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: String,
    pub enabled: bool,
    pub created_at: i64,
    pub previous_until: Option<i64>,
}

/// An open registry (the PostgreSQL client is boxed: it is three times the SQLite handle).
pub enum Store {
    Sqlite(rusqlite::Connection),
    Pg { client: Box<postgres::Client>, url: String },
}

/// Connects to PostgreSQL and completes the schema if anything is missing.
pub fn connect_pg(url: &str) -> Result<postgres::Client> {
    let mut c = pg::connect(url, Duration::from_secs(10))
        .map_err(|e| format!("cannot connect to {}: {e}", redact_url(url)))?;
    let ready = pg::schema_ready(&mut c)
        .map_err(|e| format!("cannot read the schema of {}: {e}", redact_url(url)))?;
    if !ready {
        pg::init_schema(&mut c).map_err(|e| {
            format!(
                "cannot create the devices table and its NOTIFY trigger in {}: {e}",
                redact_url(url)
            )
        })?;
    }
    Ok(c)
}

impl Store {
    pub fn open(dir: &GwDir) -> Result<Store> {
        match &dir.registry_url {
            Some(url) => Ok(Store::Pg { client: Box::new(connect_pg(url)?), url: url.clone() }),
            None => Ok(Store::Sqlite(dir.open_db()?)),
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> String {
        match self {
            Store::Sqlite(_) => e.to_string(),
            Store::Pg { url, .. } => format!("{}: {e}", redact_url(url)),
        }
    }

    pub fn exists(&mut self, id: &str) -> Result<bool> {
        let r = match self {
            Store::Sqlite(c) => c
                .query_row("SELECT 1 FROM devices WHERE device_id = ?1", [id], |_| Ok(()))
                .optional()
                .map(|o| o.is_some())
                .map_err(|e| e.to_string()),
            Store::Pg { client, .. } => client
                .query_opt("SELECT 1 FROM devices WHERE device_id = $1", &[&id])
                .map(|o| o.is_some())
                .map_err(|e| e.to_string()),
        };
        r.map_err(|e| self.err(e))
    }

    pub fn must_exist(&mut self, id: &str) -> Result<()> {
        if self.exists(id)? {
            Ok(())
        } else {
            Err(format!("no device {id:?} in the registry"))
        }
    }

    /// Inserts enabled devices in one transaction: all or nothing.
    pub fn insert(&mut self, rows: &[(String, String)], now: i64) -> Result<()> {
        let r = match self {
            Store::Sqlite(c) => (|| {
                let tx = c.transaction()?;
                for (id, secret) in rows {
                    tx.execute(
                        "INSERT INTO devices (device_id, shared_secret, created_at, enabled) VALUES (?1, ?2, ?3, 1)",
                        params![id, secret, now],
                    )?;
                }
                tx.commit()
            })()
            .map_err(|e| e.to_string()),
            Store::Pg { client, .. } => (|| {
                let mut tx = client.transaction()?;
                for (id, secret) in rows {
                    // `enabled` takes its default: true, or 1 in a hand-made integer column.
                    tx.execute(
                        "INSERT INTO devices (device_id, shared_secret, created_at) VALUES ($1, $2, $3::bigint)",
                        &[id, secret, &now],
                    )?;
                }
                tx.commit()
            })()
            .map_err(|e| e.to_string()),
        };
        r.map_err(|e| self.err(e))
    }

    pub fn list(&mut self) -> Result<Vec<Row>> {
        Ok(self.rows(None)?.into_iter().map(|(r, _)| r).collect())
    }

    /// The row of `id` and its secret.
    pub fn get(&mut self, id: &str) -> Result<Option<(Row, String)>> {
        Ok(self.rows(Some(id))?.pop())
    }

    fn rows(&mut self, id: Option<&str>) -> Result<Vec<(Row, String)>> {
        let r = match self {
            Store::Sqlite(c) => (|| {
                let sql = "SELECT device_id, enabled, created_at, previous_secret_expires_at, shared_secret FROM devices WHERE ?1 IS NULL OR device_id = ?1 ORDER BY device_id";
                let mut s = c.prepare(sql)?;
                let rows = s.query_map([id], |r| {
                    Ok((
                        Row {
                            id: r.get(0)?,
                            enabled: r.get::<_, i64>(1)? != 0,
                            created_at: r.get(2)?,
                            previous_until: r.get(3)?,
                        },
                        r.get(4)?,
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })()
            .map_err(|e| e.to_string()),
            Store::Pg { client, .. } => client
                .query(
                    // Casts: a hand-made table may use integer types where the CLI uses others.
                    "SELECT device_id, enabled::int <> 0, created_at::bigint, previous_secret_expires_at::bigint, shared_secret \
                     FROM devices WHERE $1::text IS NULL OR device_id = $1 ORDER BY device_id",
                    &[&id],
                )
                .and_then(|rows| {
                    rows.iter()
                        .map(|r| {
                            Ok((
                                Row {
                                    id: r.try_get(0)?,
                                    enabled: r.try_get(1)?,
                                    created_at: r.try_get(2)?,
                                    previous_until: r.try_get(3)?,
                                },
                                r.try_get(4)?,
                            ))
                        })
                        .collect()
                })
                .map_err(|e| e.to_string()),
        };
        r.map_err(|e| self.err(e))
    }

    pub fn set_enabled(&mut self, id: &str, enabled: bool) -> Result<()> {
        let r = match self {
            Store::Sqlite(c) => c
                .execute(
                    "UPDATE devices SET enabled = ?2 WHERE device_id = ?1",
                    params![id, enabled as i64],
                )
                .map(drop)
                .map_err(|e| e.to_string()),
            // An untyped literal takes the column's type: boolean, or a hand-made integer.
            Store::Pg { client, .. } => client
                .execute(
                    &format!(
                        "UPDATE devices SET enabled = '{}' WHERE device_id = $1",
                        enabled as u8
                    ),
                    &[&id],
                )
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        r.map_err(|e| self.err(e))
    }

    pub fn remove(&mut self, id: &str) -> Result<()> {
        let r = match self {
            Store::Sqlite(c) => c
                .execute("DELETE FROM devices WHERE device_id = ?1", [id])
                .map(drop)
                .map_err(|e| e.to_string()),
            Store::Pg { client, .. } => client
                .execute("DELETE FROM devices WHERE device_id = $1", &[&id])
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        r.map_err(|e| self.err(e))
    }

    /// The current secret becomes the previous one, valid until `until`.
    pub fn rotate(&mut self, id: &str, until: i64, secret: &str) -> Result<()> {
        let r = match self {
            Store::Sqlite(c) => c
                .execute(
                    "UPDATE devices SET previous_secret = shared_secret, previous_secret_expires_at = ?2, shared_secret = ?3 WHERE device_id = ?1",
                    params![id, until, secret],
                )
                .map(drop)
                .map_err(|e| e.to_string()),
            Store::Pg { client, .. } => client
                .execute(
                    "UPDATE devices SET previous_secret = shared_secret, previous_secret_expires_at = $2::bigint, shared_secret = $3 WHERE device_id = $1",
                    &[&id, &until, &secret],
                )
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        r.map_err(|e| self.err(e))
    }
}
