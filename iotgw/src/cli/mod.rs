//! The `iotgw` command-line tool, as library code so it can be tested. The binary in
//! `iotgw/src/main.rs` only calls [`main`].

pub mod backend;
pub mod check;
pub mod device;
pub mod gwdir;
pub mod simulate;
pub mod store;

use clap::{Parser, Subcommand};
use gwdir::{GwDir, InitOptions};
use secure_iot_gateway::envelope::{self, Envelope};
use secure_iot_gateway::json::Json;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

const AFTER_HELP: &str = "\
Getting started:
  iotgw init /etc/secure-iot-gateway --host mqtt.example.com
  iotgw device add sensor_001 --dir /etc/secure-iot-gateway
  mosquitto -c /etc/secure-iot-gateway/mosquitto.conf
  iotgw sign --device sensor_001 --payload '{\"temperature\":22.5}' --dir /etc/secure-iot-gateway \\
    | mosquitto_pub -h localhost -p 8883 --cafile ca.pem --cert devices/sensor_001.pem \\
        --key devices/sensor_001.key -t device/sensor_001/data -s

Files in a gateway directory (made by `init`):
  ca.pem ca.key            the CA (ca.key never leaves this machine)
  broker.pem broker.key    the broker's certificate and key
  devices.db               the device registry (holds secrets; mode 0600)
  devices/ID.pem ID.key    each device's certificate and key
  state/outbox/            the plugin's outbox log and dead_letters.jsonl
  acl, mosquitto.conf      broker configuration with absolute paths

A registry shared by a cluster of brokers lives in PostgreSQL (plugin_opt_registry_url):
  iotgw registry init --registry-url postgresql://iotgw:PASSWORD@db.example.com/iotgw
  iotgw device add sensor_001 --dir /etc/secure-iot-gateway --registry-url postgresql://...
  Every `device` command takes --registry-url; the table and its NOTIFY trigger are created on
  first use (or by `registry init`), and every broker sees a change within a second.

Exit status: 0 success, 1 error (message on stderr), 2 simulate saw an unexpected verdict.
Documentation: /usr/share/doc/secure-iot-gateway/ (README.md, mosquitto.conf.example).";

/// Operate a secure-iot-gateway: PKI, device registry, signing, simulation, demo backend.
#[derive(Parser, Debug)]
#[command(name = "iotgw", version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a gateway directory: CA, broker certificate, registry, ACL, mosquitto.conf.
    Init {
        /// The directory to create (or complete).
        dir: PathBuf,
        /// Extra DNS names or IP addresses for the broker certificate (localhost and 127.0.0.1
        /// are always included). Repeatable.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// MQTT over TLS port in the generated mosquitto.conf.
        #[arg(long, default_value_t = 8883)]
        port: u16,
        /// Address the listener binds to.
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        /// Path of the plugin .so written into mosquitto.conf (default: the installed one, else
        /// the one built next to this binary).
        #[arg(long)]
        plugin: Option<PathBuf>,
        /// Backend URL template written into mosquitto.conf.
        #[arg(long, default_value = secure_iot_gateway::config::DEFAULT_BACKEND_URL)]
        backend_url: String,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace an existing CA (every certificate it issued stops working).
        #[arg(long)]
        force: bool,
    },
    /// Manage devices in the registry.
    Device {
        /// The gateway directory made by `init`.
        #[arg(long, short = 'd', default_value = ".", global = true)]
        dir: PathBuf,
        /// The registry is this PostgreSQL database (postgresql://USER[:PASSWORD]@HOST/DB, the
        /// brokers' plugin_opt_registry_url) instead of DIR/devices.db; the CA and the
        /// certificates stay in DIR. The table and its NOTIFY trigger are created on first use.
        #[arg(long, global = true, value_name = "URL")]
        registry_url: Option<String>,
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Print a signed envelope for a device (for mosquitto_pub by hand).
    Sign {
        /// The device id (envelope device_id).
        #[arg(long)]
        device: String,
        /// The payload, as JSON.
        #[arg(long)]
        payload: String,
        /// The secret; by default it is read from the registry in --dir.
        #[arg(long)]
        secret: Option<String>,
        /// The gateway directory (for the registry).
        #[arg(long, short = 'd', default_value = ".")]
        dir: PathBuf,
        /// Default: a fresh UUID v4.
        #[arg(long)]
        message_id: Option<String>,
        /// Unix seconds; default: now.
        #[arg(long)]
        timestamp: Option<i64>,
        /// Extra envelope member NAME=JSON (covered by the signature). Repeatable.
        #[arg(long = "extra")]
        extras: Vec<String>,
    },
    /// Check an envelope's structure and signature (from the argument or standard input).
    Verify {
        /// The envelope JSON; read from standard input when absent.
        envelope: Option<String>,
        /// The secret; by default the device's, from the registry in --dir.
        #[arg(long)]
        secret: Option<String>,
        /// The gateway directory (for the registry).
        #[arg(long, short = 'd', default_value = ".")]
        dir: PathBuf,
    },
    /// Run simulated devices against a gateway.
    Simulate {
        /// The gateway directory (certificates, CA, secrets).
        #[arg(long, short = 'd', default_value = ".")]
        dir: PathBuf,
        /// Device ids (must exist in the registry, with certificates in DIR/devices). Repeatable.
        #[arg(long = "device", required = true)]
        devices: Vec<String>,
        /// Broker host name (must match the broker certificate).
        #[arg(long, default_value = "localhost")]
        host: String,
        /// Broker TLS port.
        #[arg(long, default_value_t = 8883)]
        port: u16,
        /// Seconds between readings.
        #[arg(long, default_value_t = 5.0)]
        interval: f64,
        /// Readings per device (0: none, e.g. to run only attacks).
        #[arg(long, default_value_t = 3)]
        count: u64,
        /// Keep sending readings until stopped (overrides --count).
        #[arg(long)]
        forever: bool,
        /// Attacks to run after the readings. Repeatable.
        #[arg(long = "attack", value_enum)]
        attacks: Vec<simulate::Attack>,
        /// Never colour the output.
        #[arg(long)]
        no_color: bool,
    },
    /// Run the demo HTTP backend.
    Backend {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:5000")]
        listen: String,
        /// Request handler threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Do not print each request.
        #[arg(long)]
        quiet: bool,
    },
    /// Set up a PostgreSQL registry (`device` commands also do it on first use).
    Registry {
        #[command(subcommand)]
        cmd: RegistryCmd,
    },
    /// Validate the plugin options of a mosquitto.conf without starting the broker.
    CheckConfig {
        /// A mosquitto.conf that loads the plugin.
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum RegistryCmd {
    /// Create the devices table, add the optional columns and (re)install the NOTIFY trigger
    /// that makes every broker see a change within a second. Idempotent.
    Init {
        /// postgresql://USER[:PASSWORD]@HOST[:PORT]/DB
        #[arg(long, value_name = "URL")]
        registry_url: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    /// Register a device and issue its certificate; prints its secret once.
    Add {
        /// Device id: 1-64 of A-Z a-z 0-9 _ . - (the certificate CN); not a service identity.
        id: String,
        /// The shared secret (at least 16 characters). Default: 32 random bytes, hex.
        #[arg(long)]
        secret: Option<String>,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// List devices (never secrets).
    List,
    /// Show one device.
    Show {
        /// Device id.
        id: String,
        /// Also print the secret.
        #[arg(long)]
        show_secret: bool,
    },
    /// Refuse the device's messages until enabled again (within a second, no restart).
    Disable {
        id: String,
    },
    Enable {
        id: String,
    },
    /// Delete the device and its certificate files.
    Remove {
        id: String,
    },
    /// Revoke the device's certificate (added to DIR/crl.pem, signed by the CA; a broker with
    /// plugin_opt_crl_file disconnects it within a second) and disable the device.
    Revoke {
        id: String,
    },
    /// New secret; the old one keeps working for the grace period, then stops.
    RotateSecret {
        /// Device id.
        id: String,
        /// How long the old secret keeps working: e.g. 24h, 90m, 3600s, 2d.
        #[arg(long, default_value = "24h")]
        grace: String,
        /// The new secret. Default: 32 random bytes, hex.
        #[arg(long)]
        secret: Option<String>,
    },
    /// Add many devices from a file of `device_id[,secret]` lines; all or nothing.
    Import {
        /// Lines of `device_id` or `device_id,secret`; blank lines and # comments are skipped.
        file: PathBuf,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

/// Parses 24h / 90m / 3600s / 2d / 3600.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    num.parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .map(|n| n * mult)
        .ok_or_else(|| format!("invalid duration {s:?} (e.g. 24h, 90m, 3600s)"))
}

fn default_plugin() -> PathBuf {
    let installed = PathBuf::from(format!("/usr/lib/{}/secure_iot_gateway.so", multiarch()));
    if installed.exists() {
        return installed;
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.join("libsecure_iot_gateway.so")))
        .filter(|p| p.exists())
        .unwrap_or(installed)
}

fn multiarch() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "aarch64-linux-gnu"
    } else {
        "x86_64-linux-gnu"
    }
}

fn secret_for(
    dir: &std::path::Path,
    device: &str,
    secret: Option<String>,
) -> Result<String, String> {
    match secret {
        Some(s) => Ok(s),
        None => device::secret_of(&GwDir::new(dir), device),
    }
}

/// The URL forms the plugin accepts (plugin_opt_registry_url).
fn check_registry_url(url: &str) -> Result<(), String> {
    if url.starts_with("postgresql://") || url.starts_with("postgres://") {
        Ok(())
    } else {
        Err(format!(
            "--registry-url {}: must start with postgresql:// (or postgres://)",
            secure_iot_gateway::config::redact_url(url)
        ))
    }
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> Result<i32, String> {
    match cli.cmd {
        Cmd::Init { dir, hosts, port, bind, plugin, backend_url, days, force } => {
            secure_iot_gateway::config::check_backend_url(&backend_url)
                .map_err(|e| format!("--backend-url {backend_url:?}: {e}"))?;
            let gw = GwDir::new(&dir);
            let notes = gw.init(&InitOptions {
                hosts,
                port,
                bind,
                plugin: plugin.unwrap_or_else(default_plugin),
                backend_url,
                force,
                days,
            })?;
            println!("gateway directory ready: {}", gw.root.display());
            for n in notes {
                println!("  {n}");
            }
            println!("next: iotgw device add sensor_001 --dir {0}\n      mosquitto -c {0}/mosquitto.conf", gw.root.display());
            Ok(0)
        }
        Cmd::Registry { cmd: RegistryCmd::Init { registry_url } } => {
            check_registry_url(&registry_url)?;
            let mut c = store::connect_pg(&registry_url)?;
            // Always reinstalled here: an older trigger is replaced by this version's.
            secure_iot_gateway::registry::pg::init_schema(&mut c).map_err(|e| {
                format!(
                    "cannot set up {}: {e}",
                    secure_iot_gateway::config::redact_url(&registry_url)
                )
            })?;
            println!(
                "registry ready: {} (table devices, NOTIFY trigger on channel {})",
                secure_iot_gateway::config::redact_url(&registry_url),
                secure_iot_gateway::registry::pg::CHANNEL
            );
            Ok(0)
        }
        Cmd::Device { dir, registry_url, cmd } => {
            if let Some(u) = &registry_url {
                check_registry_url(u)?;
            }
            let gw = GwDir::new(&dir).with_registry_url(registry_url);
            match cmd {
                DeviceCmd::Add { id, secret, days } => {
                    let s = device::add(&gw, &id, secret.as_deref(), days)?;
                    println!(
                        "added {id}; certificate {} and key {}",
                        gw.device_cert(&id).display(),
                        gw.device_key(&id).display()
                    );
                    println!("secret (shown once, store it in the device): {s}");
                }
                DeviceCmd::List => {
                    println!(
                        "{:<32} {:<8} {:<12} {:<6} rotation",
                        "device_id", "enabled", "created_at", "cert"
                    );
                    for d in device::list(&gw)? {
                        let rot = match d.previous_until {
                            Some(u) if u >= secure_iot_gateway::host::unix_now() => {
                                format!("old secret valid until {u}")
                            }
                            _ => "-".into(),
                        };
                        println!(
                            "{:<32} {:<8} {:<12} {:<6} {rot}",
                            d.id,
                            if d.enabled { "yes" } else { "no" },
                            d.created_at,
                            if d.has_cert { "yes" } else { "no" }
                        );
                    }
                }
                DeviceCmd::Show { id, show_secret } => {
                    let (d, s) = device::show(&gw, &id, show_secret)?;
                    println!(
                        "device_id:  {}\nenabled:    {}\ncreated_at: {}\ncertificate: {}",
                        d.id,
                        d.enabled,
                        d.created_at,
                        gw.device_cert(&id).display()
                    );
                    if let Some(u) = d.previous_until {
                        println!("previous secret valid until: {u}");
                    }
                    match s {
                        Some(s) => println!("secret:     {s}"),
                        None => println!("secret:     (hidden; --show-secret prints it)"),
                    }
                }
                DeviceCmd::Disable { id } => {
                    device::set_enabled(&gw, &id, false)?;
                    println!("disabled {id}: its messages are refused within a second");
                }
                DeviceCmd::Enable { id } => {
                    device::set_enabled(&gw, &id, true)?;
                    println!("enabled {id}");
                }
                DeviceCmd::Remove { id } => {
                    device::remove(&gw, &id)?;
                    println!("removed {id} and its certificate files");
                }
                DeviceCmd::Revoke { id } => {
                    let (serial, n) = device::revoke(&gw, &id)?;
                    println!(
                        "revoked {id}: certificate serial {serial} added to {} ({n} revoked) and the device disabled",
                        gw.crl().display()
                    );
                }
                DeviceCmd::RotateSecret { id, grace, secret } => {
                    let g = parse_duration(&grace)?;
                    let (s, until) = device::rotate(&gw, &id, secret.as_deref(), g)?;
                    println!("rotated {id}; the old secret works until {until} (unix time)");
                    println!("new secret (shown once): {s}");
                }
                DeviceCmd::Import { file, days } => {
                    let text = std::fs::read_to_string(&file)
                        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                    let done = device::import(&gw, &text, days)?;
                    println!("imported {} devices (id,secret):", done.len());
                    for (id, s) in done {
                        println!("{id},{s}");
                    }
                }
            }
            Ok(0)
        }
        Cmd::Sign { device, payload, secret, dir, message_id, timestamp, extras } => {
            if !envelope::valid_device_id(&device) {
                return Err(format!("invalid device id {device:?}"));
            }
            let secret = secret_for(&dir, &device, secret)?;
            // The verifier's strict reading: what it would refuse is never signed.
            let p = secure_iot_gateway::json::parse_strict(payload.as_bytes())
                .map_err(|e| format!("--payload is not JSON the gateway accepts: {e}"))?;
            let mut members = vec![
                ("device_id".to_string(), Json::String(device)),
                (
                    "timestamp".to_string(),
                    Json::Number(
                        timestamp.unwrap_or_else(secure_iot_gateway::host::unix_now).into(),
                    ),
                ),
                (
                    "message_id".to_string(),
                    Json::String(message_id.unwrap_or_else(envelope::uuid_v4)),
                ),
                ("payload".to_string(), p),
            ];
            for e in extras {
                let (k, v) = e
                    .split_once('=')
                    .ok_or_else(|| format!("--extra {e:?}: expected NAME=JSON"))?;
                if members.iter().any(|(m, _)| m == k) || k == "signature" {
                    return Err(format!("--extra {k:?}: that member is already set"));
                }
                let v = secure_iot_gateway::json::parse_strict(v.as_bytes())
                    .map_err(|err| format!("--extra {k}: not JSON the gateway accepts: {err}"))?;
                members.push((k.to_string(), v));
            }
            println!("{}", envelope::sign_members(secret.as_bytes(), &members));
            Ok(0)
        }
        Cmd::Verify { envelope: text, secret, dir } => {
            let text = match text {
                Some(t) => t,
                None => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s).map_err(|e| e.to_string())?;
                    s
                }
            };
            let env = match Envelope::parse(
                text.trim_end_matches(['\n', '\r']).as_bytes(),
                secure_iot_gateway::config::MAX_PAYLOAD_LIMIT,
            ) {
                Ok(e) => e,
                Err(r) => {
                    println!("invalid: {r}");
                    return Ok(1);
                }
            };
            let secret = secret_for(&dir, env.device_id(), secret)?;
            if envelope::verify(secret.as_bytes(), &env.canonical(), &env.signature) {
                let skew = secure_iot_gateway::host::unix_now() - env.timestamp;
                println!(
                    "valid: device {} message {} (timestamp {skew} s ago)",
                    env.device_id(),
                    env.message_id()
                );
                Ok(0)
            } else {
                println!("invalid: signature (HMAC mismatch)");
                Ok(1)
            }
        }
        Cmd::Simulate { dir, devices, host, port, interval, count, forever, attacks, no_color } => {
            let gw = GwDir::new(&dir);
            let mut with_secrets = Vec::new();
            for d in devices {
                let s = device::secret_of(&gw, &d)?;
                with_secrets.push((d, s));
            }
            let color = !no_color && std::env::var_os("NO_COLOR").is_none();
            let count = if forever { None } else { Some(count) };
            let o = simulate::SimOptions {
                host,
                port,
                interval: Duration::from_secs_f64(interval.max(0.0)),
                count,
                attacks,
                color,
            };
            let (sent, ok) = simulate::run(&gw, &with_secrets, &o)?;
            Ok(if sent == ok { 0 } else { 2 })
        }
        Cmd::Backend { listen, threads, quiet } => {
            backend::serve(&listen, threads, quiet)?;
            Ok(0)
        }
        Cmd::CheckConfig { file } => match check::check(&file) {
            Ok(report) => {
                for w in &report.warnings {
                    println!("warning: {w}");
                }
                println!("{}", report.summary);
                Ok(0)
            }
            Err(e) => {
                println!("configuration error: {e}");
                Ok(1)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(86400));
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert_eq!(parse_duration("2d"), Ok(172800));
        assert_eq!(parse_duration("15"), Ok(15));
        assert!(parse_duration("-1h").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
