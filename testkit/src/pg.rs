//! A throw-away PostgreSQL server for the PostgreSQL registry's tests.
//!
//! `initdb` in a temp dir (the newest `/usr/lib/postgresql/*/bin`, or `$PG_BIN_DIR`), `trust`
//! authentication, listening on 127.0.0.1 on a reserved [`Port`] with its unix socket inside the
//! temp dir, `fsync=off`. PostgreSQL refuses to run as root, so when we are root the temp dir is
//! handed to `nobody` and both `initdb` and `postgres` run through `setpriv`. Readiness is a real
//! connection (bounded); every failure message carries the server's log. [`Postgres::stop`] and
//! [`Postgres::start_again`] make outages on the same port and data; Drop stops the server (fast
//! shutdown, then SIGKILL) and removes the dir.

use crate::Port;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A running (or stopped, see [`Postgres::stop`]) PostgreSQL server; killed on drop.
pub struct Postgres {
    dir: tempfile::TempDir,
    port: Port,
    bin: PathBuf,
    /// `(uid, gid)` to run as when we are root.
    user: Option<(u32, u32)>,
    child: Option<Child>,
}

/// The newest installed server's `bin` directory.
fn bin_dir() -> PathBuf {
    if let Ok(p) = std::env::var("PG_BIN_DIR") {
        return PathBuf::from(p);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!("no /usr/lib/postgresql/*/bin/initdb; `make deps` installs the postgresql package")
    })
}

fn id_of(args: &[&str]) -> u32 {
    let o = Command::new("id").args(args).output().expect("id runs");
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap_or_else(|_| panic!("id {args:?}"))
}

impl Postgres {
    /// Creates and starts a fresh server; panics (with its log) if it is not ready within 20 s.
    pub fn start() -> Postgres {
        let dir = tempfile::Builder::new().prefix("iotgw-pg-").tempdir().unwrap();
        let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let user = root.then(|| (id_of(&["-u", "nobody"]), id_of(&["-g", "nobody"])));
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let mut pg = Postgres { dir, port: Port::reserve(), bin: bin_dir(), user, child: None };
        let data = pg.data();
        let out = pg
            .command("initdb")
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb from {}: {e}", pg.bin.display()));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 40\n",
            pg.port.get(),
            pg.dir.path().display()
        );
        let mut c = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        c.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), c).unwrap();
        pg.start_again();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// `bin/NAME`, as `nobody` when we are root.
    fn command(&self, name: &str) -> Command {
        let exe = self.bin.join(name);
        match self.user {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A connection URL for the `postgres` database as the `postgres` superuser.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port.get())
    }

    /// The same with a password in it (`trust` ignores it), to check that logs hide it.
    pub fn url_with_password(&self, password: &str) -> String {
        format!("postgresql://postgres:{password}@127.0.0.1:{}/postgres", self.port.get())
    }

    pub fn port(&self) -> u16 {
        self.port.get()
    }

    /// A new connection.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(), postgres::NoTls).unwrap_or_else(|e| {
            panic!("cannot connect to {}: {e}; log:\n{}", self.url(), self.log())
        })
    }

    /// Runs `sql` (one or more statements) on a new connection.
    pub fn execute(&self, sql: &str) {
        self.client()
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}; log:\n{}", self.log()));
    }

    /// Starts the server (again, after [`Self::stop`]) on the same port and data dir, and waits
    /// until it answers a query.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = crate::spawn_logged(
            self.command("postgres").arg("-D").arg(self.data()),
            &self.log_path(),
            "postgres",
        );
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        crate::Starting {
            what: "postgres",
            within: Duration::from_secs(20),
            every: Duration::from_millis(50),
            child: |p: &mut Postgres| &mut p.child,
            ready: |p| {
                let mut c = postgres::Client::connect(&p.url(), postgres::NoTls)
                    .map_err(|e| e.to_string())?;
                c.simple_query("SELECT 1").map(drop).map_err(|e| e.to_string())
            },
            log: Postgres::log,
        }
        .wait(self);
    }

    /// Fast shutdown (SIGINT: clients are disconnected at once), waited for: an outage.
    pub fn stop(&mut self) {
        self.shut_down(Duration::from_secs(10));
    }

    /// SIGINT, not SIGTERM: to PostgreSQL SIGTERM is a "smart" shutdown that waits for every
    /// client, e.g. a broker of the same test still connected (seen: 10+ s). SIGKILL after
    /// `within`.
    fn shut_down(&mut self, within: Duration) {
        if let Some(c) = &self.child {
            signal(c, "INT");
        }
        if self.child.as_mut().is_some_and(|c| wait_exit(c, within)) {
            self.child = None;
        }
        crate::kill_and_reap(&mut self.child);
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn signal(c: &Child, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(c.id().to_string()).status();
}

fn wait_exit(c: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.shut_down(Duration::from_secs(5));
        // The TempDir removes itself (root may remove nobody's files).
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_starts_stops_and_starts_again_with_its_data() {
        let mut pg = Postgres::start();
        pg.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (7)");
        pg.stop();
        // Negative control: stopped means unreachable.
        assert!(postgres::Client::connect(&pg.url(), postgres::NoTls).is_err());
        pg.start_again();
        let v: i32 = pg.client().query_one("SELECT x FROM t", &[]).unwrap().get(0);
        assert_eq!(v, 7);
        let dir = pg.dir().to_path_buf();
        drop(pg);
        assert!(!dir.exists(), "the temp dir is removed");
    }
}
