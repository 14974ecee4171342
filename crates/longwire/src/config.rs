//! The TOML configuration file, and merging it with the command line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use longwire_core::{AddressPolicy, AllowList};
use serde::Deserialize;

use crate::cli::ServeArgs;
use longwire_nbd::TlsMode;

/// Everything `serve` needs, whether it came from flags or a file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// TCP addresses to listen on.
    #[serde(default)]
    pub listen: Vec<String>,
    /// Unix socket to listen on.
    pub unix: Option<PathBuf>,
    /// Seconds a client may take to finish the handshake.
    pub handshake_timeout: Option<u64>,
    /// Requests in flight per connection.
    pub max_in_flight: Option<usize>,
    /// Most NBD connections at once, server-wide (0: unlimited).
    pub max_connections: Option<usize>,
    /// Seconds an NBD connection or iSCSI session may sit idle (0: forever).
    pub idle_timeout: Option<u64>,
    /// Client addresses (or ranges) that may use exports and targets with
    /// no `allow` of their own (None: every address).
    pub allow: Option<Vec<String>>,
    /// Threads doing blocking file I/O.
    pub io_threads: Option<usize>,
    /// TCP addresses to listen on for iSCSI.
    #[serde(default)]
    pub iscsi: Vec<String>,
    /// NBD TLS mode: "off", "optional" or "required".
    pub tls: Option<String>,
    /// Server certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA for client certificates (PEM); set: clients must present one.
    pub tls_ca: Option<PathBuf>,
    /// The TLS mode in effect, from `tls`/`--tls` or the default.
    #[serde(skip)]
    pub tls_mode: TlsMode,
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportConfig>,
    /// `[[iscsi_target]]` tables: targets grouping exports as LUNs, with
    /// CHAP and initiator allow-lists.
    #[serde(default, rename = "iscsi_target")]
    pub iscsi_targets: Vec<IscsiTargetConfig>,
    /// The iSCSI listeners are the built-in default rather than asked for
    /// (then a busy port is a warning, not an error).
    #[serde(skip)]
    pub iscsi_is_default: bool,
    /// Admin HTTP endpoint (`/metrics`, `/status`) address.
    pub admin: Option<String>,
    /// The admin address is the built-in default (a busy port is a warning).
    #[serde(skip)]
    pub admin_is_default: bool,
}

/// One `[[iscsi_target]]` table.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IscsiTargetConfig {
    /// iSCSI name, e.g. `iqn.2026-11.dev.longwire:group`.
    pub name: String,
    /// Exports served as LUN 0, 1, … in this order.
    pub luns: Vec<String>,
    /// TargetAlias shown to initiators.
    #[serde(default)]
    pub alias: Option<String>,
    /// CHAP: initiators must log in as this user with this secret.
    #[serde(default)]
    pub chap_user: Option<String>,
    #[serde(default)]
    pub chap_secret: Option<String>,
    /// Mutual CHAP: the target authenticates itself with these.
    #[serde(default)]
    pub mutual_user: Option<String>,
    #[serde(default)]
    pub mutual_secret: Option<String>,
    /// Initiator names allowed to log in (empty: everyone).
    #[serde(default)]
    pub allow_initiators: Vec<String>,
    /// Client addresses (or ranges) that may see and log in to the target
    /// (None: who may use every one of its LUNs' exports).
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// Most sessions of this target at once (None: no cap of its own).
    #[serde(default)]
    pub max_connections: Option<usize>,
}

/// One `[[export]]` table. The volume is exactly one of `uri`, `concat`
/// and `stripe` (see [`ExportConfig::source`]).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub name: String,
    /// Volume URI, as on the command line.
    #[serde(default)]
    pub uri: Option<String>,
    /// Part URIs laid end to end (ENBD's linear aggregation).
    #[serde(default)]
    pub concat: Option<Vec<String>>,
    /// Part URIs striped RAID 0 style (ENBD's striped aggregation).
    #[serde(default)]
    pub stripe: Option<Vec<String>>,
    /// Stripe size for `stripe` (e.g. `"64K"` or `65536`; default 64K).
    #[serde(default)]
    pub stripe_size: Option<SizeValue>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub readonly: bool,
    /// NBD TLS: only clients whose certificate subject has one of these
    /// Common Names (`"CN=name"`) may use this export.
    #[serde(default)]
    pub tls_allow: Vec<String>,
    /// Most NBD connections using this export at once (None: no cap
    /// beyond the server-wide one).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Client addresses (or ranges) that may use this export, over NBD and
    /// as its default iSCSI target (None: the server-wide `allow`).
    #[serde(default)]
    pub allow: Option<Vec<String>>,
}

/// A size in the config file: a number of bytes or a string such as `"64K"`
/// (see [`longwire_store::parse_size`]).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(s) => longwire_store::parse_size(s),
        }
    }
}

/// Stripe size when `stripe_size` is not given.
pub const DEFAULT_STRIPE_SIZE: u64 = 64 * 1024;

/// Where an export's volume comes from, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportSource<'a> {
    /// One volume URI.
    Uri(&'a str),
    /// Parts laid end to end.
    Concat(&'a [String]),
    /// Parts striped in units of `stripe_size` bytes.
    Stripe { parts: &'a [String], stripe_size: u64 },
}

impl ExportConfig {
    /// Which volume this export serves: exactly one of `uri`, `concat` and
    /// `stripe` must be given, `stripe_size` only with `stripe`.
    pub fn source(&self) -> anyhow::Result<ExportSource<'_>> {
        let name = &self.name;
        let given: Vec<&str> = [("uri", self.uri.is_some()), ("concat", self.concat.is_some()), ("stripe", self.stripe.is_some())]
            .into_iter()
            .filter_map(|(k, set)| set.then_some(k))
            .collect();
        if given.len() != 1 {
            let what = if given.is_empty() { "none is".to_string() } else { format!("{} are", given.join(" and ")) };
            bail!(
                "export {name:?} needs exactly one of uri (one volume), concat (parts end to end) or stripe (parts striped); {what} given"
            );
        }
        if self.stripe_size.is_some() && self.stripe.is_none() {
            bail!("export {name:?}: stripe_size only goes with stripe");
        }
        let check_parts = |key: &str, parts: &[String]| -> anyhow::Result<()> {
            if parts.is_empty() {
                bail!("export {name:?}: {key} needs at least one part URI, e.g. {key} = [\"file:a.img?size=1G\", \"file:b.img?size=1G\"]");
            }
            if parts.iter().any(|p| p.is_empty()) {
                bail!("export {name:?}: {key} has an empty part URI");
            }
            Ok(())
        };
        if let Some(uri) = &self.uri {
            if uri.is_empty() {
                bail!("export {name:?}: uri is empty");
            }
            return Ok(ExportSource::Uri(uri));
        }
        if let Some(parts) = &self.concat {
            check_parts("concat", parts)?;
            return Ok(ExportSource::Concat(parts));
        }
        let parts = self.stripe.as_deref().expect("exactly one source is set");
        check_parts("stripe", parts)?;
        let stripe_size = match &self.stripe_size {
            None => DEFAULT_STRIPE_SIZE,
            Some(v) => v.bytes().map_err(|e| anyhow::anyhow!("export {name:?}: stripe_size: {e}"))?,
        };
        if stripe_size == 0 {
            bail!("export {name:?}: stripe_size must not be zero");
        }
        Ok(ExportSource::Stripe { parts, stripe_size })
    }
}

/// Default listen address when nothing else is said.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
/// Default iSCSI address when nothing else is said.
pub const DEFAULT_ISCSI: &str = "127.0.0.1:3260";
/// Default admin endpoint address (also where `longwire status` looks).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9810";

impl Config {
    /// Load the config file (if any) and apply command-line flags on top:
    /// exports add up, listen addresses and settings from flags win. With
    /// no listener of any kind, NBD and iSCSI get their default addresses;
    /// once any is given, only those are opened.
    pub fn from_args(args: &ServeArgs) -> anyhow::Result<Config> {
        let mut cfg = match &args.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        for spec in &args.exports {
            cfg.exports.push(parse_export_flag(spec)?);
        }
        if !args.listen.is_empty() {
            cfg.listen = args.listen.clone();
        }
        if args.unix.is_some() {
            cfg.unix = args.unix.clone();
        }
        if args.handshake_timeout.is_some() {
            cfg.handshake_timeout = args.handshake_timeout;
        }
        if args.max_in_flight.is_some() {
            cfg.max_in_flight = args.max_in_flight;
        }
        if args.io_threads.is_some() {
            cfg.io_threads = args.io_threads;
        }
        if args.max_connections.is_some() {
            cfg.max_connections = args.max_connections;
        }
        if args.idle_timeout.is_some() {
            cfg.idle_timeout = args.idle_timeout;
        }
        cfg.apply_allow_flags(&args.allow)?;
        if !args.iscsi.is_empty() {
            if args.no_iscsi {
                bail!("--iscsi and --no-iscsi contradict each other");
            }
            cfg.iscsi = args.iscsi.clone();
        }
        if args.no_iscsi {
            cfg.iscsi.clear();
        }
        if args.admin.is_some() {
            if args.no_admin {
                bail!("--admin and --no-admin contradict each other");
            }
            cfg.admin = args.admin.clone();
        }
        if args.no_admin {
            cfg.admin = None;
        }
        if cfg.listen.is_empty() && cfg.unix.is_none() && cfg.iscsi.is_empty() {
            // The zero-configuration server also opens the admin endpoint.
            if cfg.admin.is_none() && !args.no_admin {
                cfg.admin = Some(DEFAULT_ADMIN.to_string());
                cfg.admin_is_default = true;
            }
            cfg.listen.push(DEFAULT_LISTEN.to_string());
            if !args.no_iscsi {
                cfg.iscsi.push(DEFAULT_ISCSI.to_string());
                cfg.iscsi_is_default = true;
            }
        }
        if cfg.exports.is_empty() {
            cfg.exports.push(default_export());
        }
        for e in &cfg.exports {
            e.source()?;
        }
        if cfg.max_in_flight == Some(0) {
            bail!("max_in_flight must be at least 1");
        }
        if let Some(e) = cfg.exports.iter().find(|e| e.max_connections == Some(0)) {
            bail!("export {:?}: max_connections must be at least 1", e.name);
        }
        if let Some(t) = cfg.iscsi_targets.iter().find(|t| t.max_connections == Some(0)) {
            bail!("iscsi_target {:?}: max_connections must be at least 1", t.name);
        }
        if cfg.io_threads == Some(0) {
            bail!("io_threads must be at least 1");
        }
        cfg.check_allow_lists()?;
        cfg.resolve_tls(args)?;
        Ok(cfg)
    }

    /// `--allow [EXPORT=]ADDR[,ADDR…]`: flags for the same export (or for
    /// the server-wide default) add up and replace the file's list.
    fn apply_allow_flags(&mut self, flags: &[String]) -> anyhow::Result<()> {
        let mut default: Option<Vec<String>> = None;
        let mut per_export: Vec<(String, Vec<String>)> = Vec::new();
        for spec in flags {
            let (export, list) = match spec.split_once('=') {
                Some((name, list)) => (Some(name), list),
                None => (None, spec.as_str()),
            };
            let entries: Vec<String> = list.split(',').map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect();
            if entries.is_empty() || export.is_some_and(str::is_empty) {
                bail!("--allow {spec:?} must look like ADDR[,ADDR…] or EXPORT=ADDR[,ADDR…], e.g. 10.0.0.0/8,::1 or disk=192.168.1.0/24");
            }
            match export {
                None => default.get_or_insert_with(Vec::new).extend(entries),
                Some(name) => match per_export.iter_mut().find(|(n, _)| n == name) {
                    Some((_, l)) => l.extend(entries),
                    None => per_export.push((name.to_string(), entries)),
                },
            }
        }
        if default.is_some() {
            self.allow = default;
        }
        for (name, list) in per_export {
            let Some(e) = self.exports.iter_mut().find(|e| e.name == name) else {
                bail!("--allow {name}=…: there is no export named {name:?}");
            };
            e.allow = Some(list);
        }
        Ok(())
    }

    /// Every `allow` entry must parse, so a typo stops the server instead
    /// of locking clients out (or in).
    fn check_allow_lists(&self) -> anyhow::Result<()> {
        let check = |what: String, list: &Option<Vec<String>>| -> anyhow::Result<()> {
            if let Some(l) = list {
                AllowList::parse(l).map_err(|e| anyhow::anyhow!("{what}: allow: {e}"))?;
            }
            Ok(())
        };
        check("config".into(), &self.allow)?;
        for e in &self.exports {
            check(format!("export {:?}", e.name), &e.allow)?;
        }
        for t in &self.iscsi_targets {
            check(format!("iscsi_target {:?}", t.name), &t.allow)?;
        }
        Ok(())
    }

    /// The address allow-lists of the exports, with the server-wide
    /// default for exports that have none.
    pub fn address_policy(&self) -> anyhow::Result<AddressPolicy> {
        let parse = |l: &Option<Vec<String>>| -> anyhow::Result<AllowList> {
            match l {
                None => Ok(AllowList::Any),
                Some(l) => AllowList::parse(l).map_err(|e| anyhow::anyhow!(e)),
            }
        };
        let default = parse(&self.allow)?;
        let mut exports = HashMap::new();
        for e in &self.exports {
            if e.allow.is_some() {
                exports.insert(e.name.clone(), parse(&e.allow)?);
            }
        }
        Ok(AddressPolicy::new(default, exports))
    }

    /// Apply the TLS flags and check the TLS settings hang together.
    fn resolve_tls(&mut self, args: &ServeArgs) -> anyhow::Result<()> {
        for (flag, val) in [(&args.tls_cert, &mut self.tls_cert), (&args.tls_key, &mut self.tls_key), (&args.tls_ca, &mut self.tls_ca)] {
            if flag.is_some() {
                *val = flag.clone();
            }
        }
        let file_mode = match &self.tls {
            Some(m) => Some(m.parse::<TlsMode>().map_err(|e| anyhow::anyhow!("config: tls: {e}"))?),
            None => None,
        };
        self.tls_mode = match args.tls.or(file_mode) {
            Some(m) => m,
            None if self.tls_cert.is_some() => TlsMode::Required,
            None => TlsMode::Off,
        };
        if self.tls_mode != TlsMode::Off {
            if self.tls_cert.is_none() || self.tls_key.is_none() {
                bail!(
                    "TLS mode {} needs a server certificate and key: --tls-cert FILE --tls-key FILE (tls_cert, tls_key in the config file)",
                    self.tls_mode
                );
            }
        } else if self.tls_ca.is_some() && args.tls.is_none() && file_mode.is_none() {
            bail!("--tls-ca (tls_ca) needs TLS: give --tls-cert and --tls-key too");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("--tls-cert and --tls-key (tls_cert, tls_key) go together");
        }
        for e in &self.exports {
            if e.tls_allow.is_empty() {
                continue;
            }
            if self.tls_mode == TlsMode::Off || self.tls_ca.is_none() {
                bail!("export {:?} has tls_allow, which needs TLS on with client certificates (tls_ca)", e.name);
            }
            for a in &e.tls_allow {
                if a.strip_prefix("CN=").is_none_or(|cn| cn.is_empty()) {
                    bail!("export {:?}: tls_allow entry {a:?} must look like \"CN=client-name\"", e.name);
                }
            }
        }
        Ok(())
    }

    fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// The embedded default: a 1 GiB sparse file volume named `default`.
pub fn default_export() -> ExportConfig {
    ExportConfig {
        name: "default".into(),
        uri: Some("file:longwire-data/default.img?size=1G".into()),
        description: Some("longwire default volume (1 GiB, sparse file in ./longwire-data)".into()),
        ..ExportConfig::default()
    }
}

/// Parse `NAME=URI` from `--export`.
fn parse_export_flag(spec: &str) -> anyhow::Result<ExportConfig> {
    let Some((name, uri)) = spec.split_once('=') else {
        bail!("--export {spec:?} must look like NAME=URI, e.g. disk=file:disk.img?size=10G");
    };
    if name.is_empty() || uri.is_empty() {
        bail!("--export {spec:?} must look like NAME=URI, e.g. disk=file:disk.img?size=10G");
    }
    Ok(ExportConfig { name: name.into(), uri: Some(uri.into()), ..ExportConfig::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(exports: &[&str]) -> ServeArgs {
        ServeArgs {
            exports: exports.iter().map(|s| s.to_string()).collect(),
            listen: vec![],
            unix: None,
            config: None,
            handshake_timeout: None,
            max_in_flight: None,
            max_connections: None,
            idle_timeout: None,
            allow: vec![],
            io_threads: None,
            iscsi: vec![],
            no_iscsi: false,
            admin: None,
            no_admin: false,
            tls: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
        }
    }

    #[test]
    fn no_arguments_gives_the_embedded_default() {
        let cfg = Config::from_args(&args(&[])).unwrap();
        assert_eq!(cfg.listen, vec![DEFAULT_LISTEN]);
        assert_eq!(cfg.iscsi, vec![DEFAULT_ISCSI]);
        assert!(cfg.iscsi_is_default);
        assert_eq!(cfg.exports, vec![default_export()]);
        assert_eq!(cfg.admin.as_deref(), Some(DEFAULT_ADMIN));
        assert!(cfg.admin_is_default);
    }

    #[test]
    fn admin_endpoint_is_on_by_default_only_without_listeners() {
        let mut a = args(&[]);
        a.listen = vec!["127.0.0.1:0".into()];
        assert_eq!(Config::from_args(&a).unwrap().admin, None);
        a.admin = Some("127.0.0.1:9900".into());
        let cfg = Config::from_args(&a).unwrap();
        assert_eq!((cfg.admin.as_deref(), cfg.admin_is_default), (Some("127.0.0.1:9900"), false));
        let mut a = args(&[]);
        a.no_admin = true;
        assert_eq!(Config::from_args(&a).unwrap().admin, None);
        a.admin = Some("127.0.0.1:9900".into());
        assert!(Config::from_args(&a).is_err(), "--admin with --no-admin");
    }

    #[test]
    fn listeners_default_only_when_none_is_given() {
        let mut a = args(&[]);
        a.listen = vec!["127.0.0.1:0".into()];
        let cfg = Config::from_args(&a).unwrap();
        assert_eq!(cfg.listen, vec!["127.0.0.1:0"]);
        assert!(cfg.iscsi.is_empty(), "an explicit NBD listener opens no iSCSI default");
        let mut a = args(&[]);
        a.iscsi = vec!["127.0.0.1:0".into()];
        let cfg = Config::from_args(&a).unwrap();
        assert!(cfg.listen.is_empty() && cfg.unix.is_none(), "an explicit iSCSI listener opens no NBD default");
        assert_eq!(cfg.iscsi, vec!["127.0.0.1:0"]);
        assert!(!cfg.iscsi_is_default);
        let mut a = args(&[]);
        a.unix = Some("x.sock".into());
        assert!(Config::from_args(&a).unwrap().iscsi.is_empty());
        let mut a = args(&[]);
        a.no_iscsi = true;
        let cfg = Config::from_args(&a).unwrap();
        assert_eq!(cfg.listen, vec![DEFAULT_LISTEN]);
        assert!(cfg.iscsi.is_empty());
        a.iscsi = vec!["127.0.0.1:0".into()];
        assert!(Config::from_args(&a).is_err());
    }

    #[test]
    fn iscsi_targets_parse_from_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
iscsi = ["127.0.0.1:3260", "[::1]:3260"]
[[export]]
name = "a"
uri = "memory:?size=1M"
[[export]]
name = "b"
uri = "memory:?size=1M"
[[iscsi_target]]
name = "iqn.2026-11.dev.longwire:group"
luns = ["a", "b"]
chap_user = "alice"
chap_secret = "0123456789ab"
allow_initiators = ["iqn.1994-05.com.redhat:client"]
"#,
        )
        .unwrap();
        let mut a = args(&[]);
        a.config = Some(path.clone());
        let cfg = Config::from_args(&a).unwrap();
        assert_eq!(cfg.iscsi, vec!["127.0.0.1:3260", "[::1]:3260"]);
        assert!(cfg.listen.is_empty(), "iscsi in the file counts as a listener");
        let t = &cfg.iscsi_targets[0];
        assert_eq!(t.luns, vec!["a", "b"]);
        assert_eq!(t.chap_user.as_deref(), Some("alice"));
        assert_eq!(t.allow_initiators, vec!["iqn.1994-05.com.redhat:client"]);
        std::fs::write(&path, "[[iscsi_target]]\nname = \"x\"\nluns = []\nchap = 1\n").unwrap();
        assert!(Config::from_args(&a).is_err(), "unknown keys in iscsi_target are errors");
    }

    #[test]
    fn tls_settings_resolve_and_reject_contradictions() {
        // No certificate: off.
        assert_eq!(Config::from_args(&args(&[])).unwrap().tls_mode, TlsMode::Off);
        // A certificate alone means required.
        let mut a = args(&[]);
        a.tls_cert = Some("c.pem".into());
        a.tls_key = Some("k.pem".into());
        assert_eq!(Config::from_args(&a).unwrap().tls_mode, TlsMode::Required);
        a.tls = Some(TlsMode::Optional);
        assert_eq!(Config::from_args(&a).unwrap().tls_mode, TlsMode::Optional);
        // A mode without a certificate, a certificate without a key, a CA alone.
        let mut a = args(&[]);
        a.tls = Some(TlsMode::Required);
        assert!(format!("{:#}", Config::from_args(&a).unwrap_err()).contains("--tls-cert"));
        let mut a = args(&[]);
        a.tls_cert = Some("c.pem".into());
        assert!(Config::from_args(&a).is_err());
        let mut a = args(&[]);
        a.tls_ca = Some("ca.pem".into());
        assert!(Config::from_args(&a).is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let file = |body: &str| {
            std::fs::write(&path, body).unwrap();
            let mut a = args(&[]);
            a.config = Some(path.clone());
            Config::from_args(&a)
        };
        let cfg = file(
            "tls = \"optional\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\ntls_ca = \"ca.pem\"\n\
             [[export]]\nname = \"a\"\nuri = \"memory:?size=1M\"\ntls_allow = [\"CN=client1\"]\n",
        )
        .unwrap();
        assert_eq!(cfg.tls_mode, TlsMode::Optional);
        assert_eq!(cfg.tls_ca.as_deref(), Some(Path::new("ca.pem")));
        assert_eq!(cfg.exports[0].tls_allow, vec!["CN=client1"]);
        assert!(file("tls = \"on\"\n").is_err(), "unknown mode");
        let no_ca = "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n[[export]]\nname = \"a\"\nuri = \"memory:\"\ntls_allow = [\"CN=x\"]\n";
        assert!(format!("{:#}", file(no_ca).unwrap_err()).contains("tls_ca"));
        let bad_entry = "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\ntls_ca = \"ca.pem\"\n[[export]]\nname = \"a\"\nuri = \"memory:\"\ntls_allow = [\"client1\"]\n";
        assert!(format!("{:#}", file(bad_entry).unwrap_err()).contains("CN=client-name"));
    }

    #[test]
    fn export_flags_parse_and_reject_garbage() {
        let cfg = Config::from_args(&args(&["a=memory:?size=1M", "b=file:x.img?size=1G&readonly=true"])).unwrap();
        assert_eq!(cfg.exports.len(), 2);
        assert_eq!(cfg.exports[1].uri.as_deref(), Some("file:x.img?size=1G&readonly=true"));
        assert_eq!(cfg.exports[1].source().unwrap(), ExportSource::Uri("file:x.img?size=1G&readonly=true"));
        assert!(Config::from_args(&args(&["novalue"])).is_err());
        assert!(Config::from_args(&args(&["=memory:"])).is_err());
    }

    /// Load `body` as a config file; the error text on failure.
    fn load_str(body: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, body).unwrap();
        let mut a = args(&[]);
        a.config = Some(path);
        Config::from_args(&a).map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn composite_exports_parse() {
        let cfg = load_str(
            r#"
[[export]]
name = "big"
concat = ["file:a.img?size=1G", "file:b.img?size=1G"]
readonly = true
description = "two disks"
[[export]]
name = "fast"
stripe = ["file:s0.img?size=1G", "file:s1.img?size=1G", "file:s2.img?size=1G"]
stripe_size = "128K"
[[export]]
name = "dflt"
stripe = ["memory:?size=1M"]
[[export]]
name = "bytes"
stripe = ["memory:?size=1M", "memory:?size=1M"]
stripe_size = 4096
[[export]]
name = "plain"
uri = "memory:?size=1M"
"#,
        )
        .unwrap();
        let e = &cfg.exports;
        assert_eq!(e[0].source().unwrap(), ExportSource::Concat(&["file:a.img?size=1G".into(), "file:b.img?size=1G".into()]));
        assert!(e[0].readonly);
        assert_eq!(e[0].description.as_deref(), Some("two disks"));
        let ExportSource::Stripe { parts, stripe_size } = e[1].source().unwrap() else { panic!("{:?}", e[1]) };
        assert_eq!(parts.len(), 3);
        assert_eq!(stripe_size, 128 * 1024);
        assert_eq!(e[2].source().unwrap(), ExportSource::Stripe { parts: &["memory:?size=1M".into()], stripe_size: DEFAULT_STRIPE_SIZE });
        assert!(matches!(e[3].source().unwrap(), ExportSource::Stripe { stripe_size: 4096, .. }));
        assert_eq!(e[4].source().unwrap(), ExportSource::Uri("memory:?size=1M"));
    }

    #[test]
    fn composite_exports_reject_bad_combinations() {
        let err = |body: &str| load_str(body).unwrap_err();
        let e = err("[[export]]\nname = \"x\"\n");
        assert!(e.contains("\"x\"") && e.contains("exactly one of uri") && e.contains("none is given"), "{e}");
        let e = err("[[export]]\nname = \"x\"\nuri = \"memory:?size=1M\"\nconcat = [\"memory:?size=1M\"]\n");
        assert!(e.contains("uri and concat are given"), "{e}");
        let e = err("[[export]]\nname = \"x\"\nconcat = [\"memory:?size=1M\"]\nstripe = [\"memory:?size=1M\"]\n");
        assert!(e.contains("concat and stripe are given"), "{e}");
        let e = err("[[export]]\nname = \"x\"\nuri = \"memory:?size=1M\"\nstripe_size = \"64K\"\n");
        assert!(e.contains("stripe_size only goes with stripe"), "{e}");
        let e = err("[[export]]\nname = \"x\"\nconcat = [\"memory:?size=1M\"]\nstripe_size = \"64K\"\n");
        assert!(e.contains("stripe_size only goes with stripe"), "{e}");
        let e = err("[[export]]\nname = \"x\"\nconcat = []\n");
        assert!(e.contains("at least one part"), "{e}");
        let e = err("[[export]]\nname = \"x\"\nstripe = [\"memory:?size=1M\"]\nstripe_size = \"64Q\"\n");
        assert!(e.contains("\"x\": stripe_size") && e.contains("unknown unit"), "{e}");
        let e = err("[[export]]\nname = \"x\"\nstripe = [\"memory:?size=1M\"]\nstripe_size = 0\n");
        assert!(e.contains("must not be zero"), "{e}");
        let e = err("[[export]]\nname = \"x\"\nstripe = [\"memory:?size=1M\"]\nstripes = 2\n");
        assert!(e.contains("stripes"), "unknown keys are still errors: {e}");
        let e = err("[[export]]\nname = \"x\"\nconcat = \"memory:?size=1M\"\n");
        assert!(e.contains("concat"), "{e}");
    }

    #[test]
    fn config_file_parses_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
listen = ["[::1]:10809"]
handshake_timeout = 3
[[export]]
name = "disk"
uri = "memory:?size=1G"
description = "scratch"
readonly = true
"#,
        )
        .unwrap();
        let mut a = args(&["extra=memory:?size=1M"]);
        a.config = Some(path.clone());
        let cfg = Config::from_args(&a).unwrap();
        assert_eq!(cfg.listen, vec!["[::1]:10809"]);
        assert_eq!(cfg.handshake_timeout, Some(3));
        assert_eq!(cfg.exports[0].description.as_deref(), Some("scratch"));
        assert!(cfg.exports[0].readonly);
        assert_eq!(cfg.exports[1].name, "extra");
        a.listen = vec!["127.0.0.1:1".into()];
        assert_eq!(Config::from_args(&a).unwrap().listen, vec!["127.0.0.1:1"]);

        std::fs::write(&path, "bogus_key = 1\n").unwrap();
        let err = Config::from_args(&a).unwrap_err();
        assert!(format!("{err:#}").contains("bogus_key"), "{err:#}");
    }
    #[test]
    fn allow_flags_replace_the_files_lists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
allow = ["10.0.0.0/8"]
[[export]]
name = "a"
uri = "memory:?size=1M"
allow = ["192.168.0.0/16"]
[[export]]
name = "b"
uri = "memory:?size=1M"
"#,
        )
        .unwrap();
        let mut a = args(&[]);
        a.config = Some(path);
        let cfg = Config::from_args(&a).unwrap();
        let ip = |s: &str| Some(s.parse().unwrap());
        let p = cfg.address_policy().unwrap();
        assert!(p.allows("a", ip("192.168.1.1")) && !p.allows("a", ip("10.0.0.1")));
        assert!(p.allows("b", ip("10.0.0.1")) && !p.allows("b", ip("192.168.1.1")));
        // Flags for the same target add up and replace the file's list.
        a.allow = vec!["a=::1".into(), "a=127.0.0.1, 127.0.0.2".into(), "172.16.0.0/12".into()];
        let p = Config::from_args(&a).unwrap().address_policy().unwrap();
        assert!(p.allows("a", ip("::1")) && p.allows("a", ip("127.0.0.2")) && !p.allows("a", ip("192.168.1.1")));
        assert!(p.allows("b", ip("172.16.0.1")) && !p.allows("b", ip("10.0.0.1")));
        for bad in ["nosuch=10.0.0.0/8", "a=", "=10.0.0.0/8", "a=10.0.0.1/8", "a=bogus"] {
            a.allow = vec![bad.into()];
            assert!(Config::from_args(&a).is_err(), "--allow {bad} must be refused");
        }
    }
}
