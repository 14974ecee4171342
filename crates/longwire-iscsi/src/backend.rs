//! The SCSI layer ([`crate::scsi::Target`]) as the transport's
//! [`ScsiBackend`], and building iSCSI targets from volumes.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use longwire_core::Volume;

use crate::login::Access;
use crate::scsi::{CommandResult, DataDirection, LogicalUnit, LunIdentity, Nexus, Target};
use crate::target::{IscsiTarget, ScsiBackend};

#[async_trait]
impl ScsiBackend for Target {
    fn data_direction(&self, lun: u64, cdb: &[u8]) -> DataDirection {
        Target::data_direction(self, lun, cdb)
    }

    async fn execute(&self, nexus: &Nexus, lun: u64, cdb: &[u8], data_out: Bytes) -> CommandResult {
        Target::execute(self, nexus, lun, cdb, data_out).await
    }

    fn lun_reset(&self, lun: u64) {
        Target::lun_reset(self, lun)
    }

    fn target_reset(&self, cold: bool) {
        Target::target_reset(self, cold)
    }

    fn nexus_lost(&self, nexus: &Nexus) {
        Target::nexus_lost(self, nexus)
    }

    fn lun_export(&self, lun: u64) -> Option<String> {
        self.logical_unit(lun).map(|lu| lu.identity().export.clone())
    }
}

/// One LUN of a target to build.
pub struct LunVolume {
    pub lun: u64,
    /// Export name: the LUN's identity (serial number, designators).
    pub export: String,
    pub volume: Arc<dyn Volume>,
}

/// Vendor and product shown by INQUIRY.
pub const VENDOR: &str = "LONGWIRE";
pub const PRODUCT: &str = "longwire";

/// Build an iSCSI target whose LUNs are the given volumes.
pub fn build_target(name: String, luns: Vec<LunVolume>, access: Access) -> IscsiTarget {
    let numbers = luns.iter().map(|l| l.lun).collect();
    let units = luns
        .into_iter()
        .map(|l| {
            let identity = LunIdentity { export: l.export, vendor: VENDOR.into(), product: PRODUCT.into() };
            (l.lun, Arc::new(LogicalUnit::new(l.volume, identity)))
        })
        .collect();
    IscsiTarget { name, luns: numbers, backend: Arc::new(Target::new(units)), access }
}
