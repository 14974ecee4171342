//! Which iSCSI targets to serve: `[[iscsi_target]]` tables group exports
//! as LUNs (with CHAP and allow-lists); every export not in any table gets
//! its own target `iqn.2026-11.dev.longwire:<export>` with the volume at
//! LUN 0.
//!
//! Address allow-lists: a default target has its export's list; a grouped
//! target its own `allow`, or else only the addresses every one of its
//! exports allows (grouping must not open an export to more clients).

use std::collections::HashSet;

use anyhow::bail;
use longwire_core::{AddressPolicy, AllowList};
use longwire_iscsi::login::{Access, Credentials};
use longwire_iscsi::target::{default_target_name, valid_iscsi_name};
use tracing::warn;

use crate::config::IscsiTargetConfig;

/// One target to build: its name, (LUN, export) pairs and access rules.
#[derive(Debug, Clone)]
pub struct TargetPlan {
    pub name: String,
    pub luns: Vec<(u64, String)>,
    pub access: Access,
}

/// The default target name of an export, with characters iSCSI names do
/// not allow (uppercase, `_`, …) made lowercase or `-`.
pub fn export_target_name(export: &str) -> String {
    let cleaned: String = export
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.' || c == ':' {
                c
            } else {
                '-'
            }
        })
        .collect();
    default_target_name(&cleaned)
}

/// Work out the targets from the config tables, the export names and
/// the exports' address allow-lists.
pub fn plan_targets(tables: &[IscsiTargetConfig], exports: &[String], addresses: &AddressPolicy) -> anyhow::Result<Vec<TargetPlan>> {
    let mut plans = Vec::new();
    let mut names = HashSet::new();
    let mut grouped = HashSet::new();
    for t in tables {
        if !valid_iscsi_name(&t.name) {
            bail!(
                "iscsi_target name {:?} is not an iSCSI name (like iqn.2026-11.dev.longwire:group: lowercase letters, digits, '-', '.', ':')",
                t.name
            );
        }
        if !names.insert(t.name.clone()) {
            bail!("iscsi_target {:?} is defined twice", t.name);
        }
        if t.luns.is_empty() {
            bail!("iscsi_target {:?} has no luns", t.name);
        }
        let mut luns = Vec::new();
        for (i, e) in t.luns.iter().enumerate() {
            if !exports.contains(e) {
                bail!("iscsi_target {:?}: lun {i} names export {e:?}, which does not exist", t.name);
            }
            if luns.iter().any(|(_, x)| x == e) {
                bail!("iscsi_target {:?}: export {e:?} is listed twice", t.name);
            }
            grouped.insert(e.clone());
            luns.push((i as u64, e.clone()));
        }
        let chap = credentials(&t.name, "chap", &t.chap_user, &t.chap_secret)?;
        let mutual = credentials(&t.name, "mutual", &t.mutual_user, &t.mutual_secret)?;
        if mutual.is_some() && chap.is_none() {
            bail!("iscsi_target {:?}: mutual CHAP needs chap_user and chap_secret too", t.name);
        }
        let allow_addresses = match &t.allow {
            Some(l) => AllowList::parse(l).map_err(|e| anyhow::anyhow!("iscsi_target {:?}: allow: {e}", t.name))?,
            None => luns.iter().fold(AllowList::Any, |acc, (_, e)| acc.intersect(addresses.for_export(e))),
        };
        plans.push(TargetPlan {
            name: t.name.clone(),
            luns,
            access: Access {
                chap,
                mutual,
                allow_initiators: t.allow_initiators.clone(),
                allow_addresses,
                max_sessions: t.max_connections,
                alias: t.alias.clone(),
            },
        });
    }
    for e in exports {
        if grouped.contains(e) {
            continue;
        }
        let name = export_target_name(e);
        if !names.insert(name.clone()) {
            bail!("export {e:?} would be served as iSCSI target {name:?}, which already exists; group it in an [[iscsi_target]] instead");
        }
        let access = Access { allow_addresses: addresses.for_export(e).clone(), ..Access::default() };
        plans.push(TargetPlan { name, luns: vec![(0, e.clone())], access });
    }
    Ok(plans)
}

fn credentials(target: &str, what: &str, user: &Option<String>, secret: &Option<String>) -> anyhow::Result<Option<Credentials>> {
    match (user, secret) {
        (None, None) => Ok(None),
        (Some(u), Some(s)) => {
            if u.is_empty() || s.is_empty() {
                bail!("iscsi_target {target:?}: {what} user and secret must not be empty");
            }
            if s.len() < 12 {
                warn!("iscsi_target {target:?}: the {what} secret is shorter than 12 bytes (RFC 7143 asks for at least 96 bits)");
            }
            Ok(Some(Credentials { user: u.clone(), secret: s.clone() }))
        }
        _ => bail!("iscsi_target {target:?}: set both {what}_user and {what}_secret, or neither"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn open() -> AddressPolicy {
        AddressPolicy::default()
    }

    #[test]
    fn address_lists_follow_the_exports() {
        let list = |l: &[&str]| AllowList::parse(l).unwrap();
        let policy = AddressPolicy::new(
            list(&["10.0.0.0/8"]),
            [("a".to_string(), list(&["10.1.0.0/16"])), ("c".to_string(), AllowList::Any)].into(),
        );
        let grouped = IscsiTargetConfig { name: "iqn.2026-11.dev.longwire:g".into(), luns: vec!["a".into(), "b".into()], ..Default::default() };
        let own = IscsiTargetConfig {
            name: "iqn.2026-11.dev.longwire:own".into(),
            luns: vec!["d".into()],
            allow: Some(vec!["::1".into()]),
            max_connections: Some(2),
            ..Default::default()
        };
        let p = plan_targets(&[grouped, own], &exports(&["a", "b", "c", "d", "e"]), &policy).unwrap();
        let access = |name: &str| p.iter().find(|t| t.name.ends_with(name)).unwrap().access.clone();
        // a (10.1/16) ∩ b (the default, 10/8).
        assert_eq!(access(":g").allow_addresses, list(&["10.1.0.0/16"]));
        assert_eq!(access(":own").allow_addresses, list(&["::1"]));
        assert_eq!(access(":own").max_sessions, Some(2));
        assert_eq!(access(":c").allow_addresses, AllowList::Any);
        assert_eq!(access(":e").allow_addresses, list(&["10.0.0.0/8"]));
        let bad = IscsiTargetConfig { allow: Some(vec!["10.1.2.3/8".into()]), ..access_table() };
        assert!(plan_targets(&[bad], &exports(&["a"]), &policy).is_err());
    }

    fn access_table() -> IscsiTargetConfig {
        IscsiTargetConfig { name: "iqn.2026-11.dev.longwire:x".into(), luns: vec!["a".into()], ..Default::default() }
    }

    #[test]
    fn one_target_per_export_by_default() {
        let p = plan_targets(&[], &exports(&["disk", "Scratch_2"]), &open()).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "iqn.2026-11.dev.longwire:disk");
        assert_eq!(p[0].luns, vec![(0, "disk".to_string())]);
        assert_eq!(p[1].name, "iqn.2026-11.dev.longwire:scratch-2");
        assert!(p[0].access.chap.is_none());
    }

    #[test]
    fn grouped_exports_become_luns() {
        let t = IscsiTargetConfig {
            name: "iqn.2026-11.dev.longwire:group".into(),
            luns: vec!["b".into(), "a".into()],
            chap_user: Some("u".into()),
            chap_secret: Some("0123456789ab".into()),
            mutual_user: Some("t".into()),
            mutual_secret: Some("ba9876543210".into()),
            allow_initiators: vec!["iqn.x".into()],
            ..Default::default()
        };
        let p = plan_targets(&[t], &exports(&["a", "b", "c"]), &open()).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].luns, vec![(0, "b".to_string()), (1, "a".to_string())]);
        assert_eq!(p[0].access.chap.as_ref().unwrap().user, "u");
        assert_eq!(p[0].access.mutual.as_ref().unwrap().user, "t");
        assert_eq!(p[0].access.allow_initiators, vec!["iqn.x"]);
        assert_eq!(p[1].name, "iqn.2026-11.dev.longwire:c");
    }

    #[test]
    fn bad_tables_are_refused() {
        let base = IscsiTargetConfig { name: "iqn.2026-11.dev.longwire:g".into(), luns: vec!["a".into()], ..Default::default() };
        let e = exports(&["a"]);
        let bad = |t: IscsiTargetConfig| plan_targets(&[t], &e, &open()).is_err();
        assert!(bad(IscsiTargetConfig { name: "Not An IQN".into(), ..base.clone() }));
        assert!(bad(IscsiTargetConfig { luns: vec!["zzz".into()], ..base.clone() }));
        assert!(bad(IscsiTargetConfig { luns: vec![], ..base.clone() }));
        assert!(bad(IscsiTargetConfig { luns: vec!["a".into(), "a".into()], ..base.clone() }));
        assert!(bad(IscsiTargetConfig { chap_user: Some("u".into()), ..base.clone() }));
        assert!(bad(IscsiTargetConfig {
            mutual_user: Some("u".into()),
            mutual_secret: Some("0123456789ab".into()),
            ..base.clone()
        }));
        assert!(plan_targets(&[base.clone(), base.clone()], &e, &open()).is_err(), "defined twice");
        let clash = IscsiTargetConfig { name: "iqn.2026-11.dev.longwire:b".into(), ..base };
        assert!(plan_targets(&[clash], &exports(&["a", "b"]), &open()).is_err(), "clashes with b's default name");
    }
}
