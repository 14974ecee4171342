//! The TOML configuration file, and merging it with the command line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::cli::ServeArgs;

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
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportConfig>,
}

/// One `[[export]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub name: String,
    /// Volume URI, as on the command line.
    pub uri: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub readonly: bool,
}

/// Default listen address when nothing else is said.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

impl Config {
    /// Load the config file (if any) and apply command-line flags on top:
    /// exports add up, listen addresses and settings from flags win.
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
        if cfg.listen.is_empty() && cfg.unix.is_none() {
            cfg.listen.push(DEFAULT_LISTEN.to_string());
        }
        if cfg.exports.is_empty() {
            cfg.exports.push(default_export());
        }
        if cfg.max_in_flight == Some(0) {
            bail!("max_in_flight must be at least 1");
        }
        Ok(cfg)
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
        uri: "file:longwire-data/default.img?size=1G".into(),
        description: Some("longwire default volume (1 GiB, sparse file in ./longwire-data)".into()),
        readonly: false,
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
    Ok(ExportConfig { name: name.into(), uri: uri.into(), description: None, readonly: false })
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
        }
    }

    #[test]
    fn no_arguments_gives_the_embedded_default() {
        let cfg = Config::from_args(&args(&[])).unwrap();
        assert_eq!(cfg.listen, vec![DEFAULT_LISTEN]);
        assert_eq!(cfg.exports, vec![default_export()]);
    }

    #[test]
    fn export_flags_parse_and_reject_garbage() {
        let cfg = Config::from_args(&args(&["a=memory:?size=1M", "b=file:x.img?size=1G&readonly=true"])).unwrap();
        assert_eq!(cfg.exports.len(), 2);
        assert_eq!(cfg.exports[1].uri, "file:x.img?size=1G&readonly=true");
        assert!(Config::from_args(&args(&["novalue"])).is_err());
        assert!(Config::from_args(&args(&["=memory:"])).is_err());
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
}
