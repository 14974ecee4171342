//! INQUIRY data: the standard page and the VPD pages (SPC-4 6.6, 7.8;
//! SBC-3 6.5).
//!
//! Identity (unit serial number, NAA designator) is a pure function of the
//! export name, so a logical unit keeps the same identity across restarts
//! and multipath software keeps recognising it.

use super::geometry::{
    Geometry, MAX_COMPARE_AND_WRITE_BLOCKS, MAX_UNMAP_DESCRIPTORS, MAX_UNMAP_LBA_COUNT,
    MAX_WRITE_SAME_BLOCKS,
};
use super::sense::Sense;
use super::{LunIdentity, Nexus};

/// Peripheral qualifier 000b, device type 00h: a direct-access block device.
pub const PERIPHERAL_DISK: u8 = 0x00;
/// Peripheral qualifier 011b, type 1Fh: no logical unit at this LUN.
pub const PERIPHERAL_NONE: u8 = 0x7f;

pub const DEFAULT_VENDOR: &str = "LONGWIRE";
pub const DEFAULT_PRODUCT: &str = "longwire volume";
/// PRODUCT REVISION LEVEL: the crate's major.minor.
const REVISION: &str = "0.1";

/// VERSION DESCRIPTORs claimed: SAM-5, iSCSI, SPC-4, SBC-3.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00a0, 0x0960, 0x0460, 0x04c0];

/// VPD pages we return, in ascending order (SPC-4 7.8.16 requires it).
pub const SUPPORTED_VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

/// IEEE company ID used in the NAA designator. longwire has no IEEE
/// registration, so this is a locally administered value (U/L bit of the
/// first octet set, "LW" after it) that cannot collide with a real OUI.
const NAA_COMPANY_ID: u32 = 0x02_4c_57;

/// Standard INQUIRY data length: through the version descriptors and the
/// reserved bytes after them (SPC-4 table 139).
const STANDARD_LEN: usize = 96;

/// FNV-1a, 128-bit: a tiny, fixed, well-known hash. The identity derived
/// from it must not change between builds, which rules out std's hasher.
fn fnv1a128(data: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = (1 << 88) + 0x13b;
    data.iter()
        .fold(OFFSET, |h, &b| (h ^ u128::from(b)).wrapping_mul(PRIME))
}

fn identity_hash(export: &str) -> u128 {
    let mut input = b"longwire-lu:".to_vec();
    input.extend_from_slice(export.as_bytes());
    fnv1a128(&input)
}

/// The NAA IEEE Registered Extended designator (NAA 6, SPC-4 7.8.6.6.4):
/// company ID, then 100 bits of the export name's hash.
pub fn naa_designator(export: &str) -> [u8; 16] {
    let h = identity_hash(export) >> 28; // top 100 bits
    let v: u128 = (6u128 << 124) | (u128::from(NAA_COMPANY_ID) << 100) | h;
    v.to_be_bytes()
}

/// UNIT SERIAL NUMBER (VPD 80h): the hash in hex, so it is printable and
/// the same for the same export name.
pub fn unit_serial(export: &str) -> String {
    format!("{:032x}", identity_hash(export))
}

/// `text` as a fixed-width, space-padded ASCII field: INQUIRY strings may
/// only hold 20h..7Eh (SPC-4 4.4.1).
fn ascii_field(text: &str, width: usize) -> Vec<u8> {
    let mut out: Vec<u8> = text
        .bytes()
        .map(|b| if (0x20..=0x7e).contains(&b) { b } else { b'_' })
        .take(width)
        .collect();
    out.resize(width, b' ');
    out
}

/// Standard INQUIRY data (EVPD = 0).
pub fn standard(identity: &LunIdentity, peripheral: u8) -> Vec<u8> {
    let mut d = vec![0u8; STANDARD_LEN];
    d[0] = peripheral;
    d[2] = 0x06; // SPC-4
    d[3] = 0x10 | 0x02; // HISUP, RESPONSE DATA FORMAT 2
    d[4] = (STANDARD_LEN - 5) as u8;
    d[7] = 0x02; // CMDQUE
    let vendor = if identity.vendor.is_empty() {
        DEFAULT_VENDOR
    } else {
        &identity.vendor
    };
    let product = if identity.product.is_empty() {
        DEFAULT_PRODUCT
    } else {
        &identity.product
    };
    d[8..16].copy_from_slice(&ascii_field(vendor, 8));
    d[16..32].copy_from_slice(&ascii_field(product, 16));
    d[32..36].copy_from_slice(&ascii_field(REVISION, 4));
    for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// What the VPD pages describe.
pub struct VpdSource<'a> {
    pub identity: &'a LunIdentity,
    pub geometry: &'a Geometry,
    pub naa: &'a [u8; 16],
    pub serial: &'a str,
    pub nexus: &'a Nexus,
}

/// A VPD page with its four-byte header.
fn page(peripheral: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + body.len());
    d.push(peripheral);
    d.push(code);
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(body);
    d
}

/// One designation descriptor (SPC-4 7.8.6.1).
fn designator(
    out: &mut Vec<u8>,
    protocol: Option<u8>,
    code_set: u8,
    assoc: u8,
    kind: u8,
    value: &[u8],
) {
    let Ok(len) = u8::try_from(value.len()) else {
        return;
    };
    out.push((protocol.unwrap_or(0) << 4) | code_set);
    out.push(if protocol.is_some() { 0x80 } else { 0 } | (assoc << 4) | kind);
    out.push(0);
    out.push(len);
    out.extend_from_slice(value);
}

/// A SCSI name string designator value: UTF-8, NUL-terminated, padded to a
/// multiple of four (SPC-4 7.8.6.11). None when it would not fit.
fn name_string(name: &str) -> Option<Vec<u8>> {
    if name.is_empty() || name.contains('\0') {
        return None;
    }
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v.resize(v.len().next_multiple_of(4), 0);
    (v.len() <= 252).then_some(v)
}

/// iSCSI protocol identifier (SPC-4 table 362).
const PROTOCOL_ISCSI: u8 = 0x5;

fn device_identification(src: &VpdSource<'_>) -> Vec<u8> {
    let mut body = Vec::new();
    // Logical unit: NAA (binary) and T10 vendor ID (ASCII).
    designator(&mut body, None, 0x1, 0, 0x3, src.naa);
    let vendor = if src.identity.vendor.is_empty() {
        DEFAULT_VENDOR
    } else {
        &src.identity.vendor
    };
    let mut t10 = ascii_field(vendor, 8);
    t10.extend_from_slice(src.serial.as_bytes());
    designator(&mut body, None, 0x2, 0, 0x1, &t10);
    // Target port and target device, when the transport told us.
    let port = src.nexus.target_port.as_str();
    if !port.is_empty() {
        designator(
            &mut body,
            Some(PROTOCOL_ISCSI),
            0x1,
            1,
            0x4,
            &1u32.to_be_bytes(),
        );
        if let Some(v) = name_string(port) {
            designator(&mut body, Some(PROTOCOL_ISCSI), 0x3, 1, 0x8, &v);
        }
        let device = port.split(",t,").next().unwrap_or(port);
        if let Some(v) = name_string(device) {
            designator(&mut body, Some(PROTOCOL_ISCSI), 0x3, 2, 0x8, &v);
        }
    }
    body
}

fn block_limits(g: &Geometry) -> Vec<u8> {
    let mut b = vec![0u8; 0x3c];
    // byte 0 (page byte 4): WSNZ = 0, so a zero WRITE SAME length means
    // "through the last block".
    b[1] = MAX_COMPARE_AND_WRITE_BLOCKS as u8;
    b[2..4].copy_from_slice(&g.granularity_blocks.to_be_bytes());
    b[4..8].copy_from_slice(&g.max_transfer_blocks.to_be_bytes());
    b[8..12].copy_from_slice(&g.optimal_transfer_blocks.to_be_bytes());
    if g.thin {
        b[16..20].copy_from_slice(&MAX_UNMAP_LBA_COUNT.to_be_bytes());
        b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        b[24..28].copy_from_slice(&u32::from(g.granularity_blocks).to_be_bytes());
        b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
    }
    b[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
    b
}

fn block_device_characteristics() -> Vec<u8> {
    let mut b = vec![0u8; 0x3c];
    b[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating medium
    b
}

fn logical_block_provisioning(g: &Geometry) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    if g.thin {
        b[1] = 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
        if g.lbprz {
            b[1] |= 0x04;
        }
        b[2] = 0x02; // thin provisioned
    }
    b
}

/// A VPD page, or INVALID FIELD IN CDB (pointing at the page code) for one
/// we do not have.
pub fn vpd(code: u8, src: &VpdSource<'_>) -> Result<Vec<u8>, Sense> {
    let p = PERIPHERAL_DISK;
    Ok(match code {
        0x00 => page(p, code, &SUPPORTED_VPD_PAGES),
        0x80 => page(p, code, src.serial.as_bytes()),
        0x83 => page(p, code, &device_identification(src)),
        0xb0 => page(p, code, &block_limits(src.geometry)),
        0xb1 => page(p, code, &block_device_characteristics()),
        0xb2 => page(p, code, &logical_block_provisioning(src.geometry)),
        _ => return Err(Sense::invalid_cdb(2, None)),
    })
}

/// VPD for a LUN with no logical unit: only the supported-pages page, and it
/// lists nothing but itself.
pub fn vpd_absent(code: u8) -> Result<Vec<u8>, Sense> {
    match code {
        0x00 => Ok(page(PERIPHERAL_NONE, 0x00, &[0x00])),
        _ => Err(Sense::invalid_cdb(2, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use longwire_core::Capabilities;

    fn identity(export: &str) -> LunIdentity {
        LunIdentity {
            export: export.into(),
            vendor: String::new(),
            product: String::new(),
        }
    }

    #[test]
    fn fnv_reference_values() {
        // Published FNV-1a 128 test vectors.
        assert_eq!(fnv1a128(b""), 0x6c62272e07bb014262b821756295c58d);
        assert_eq!(fnv1a128(b"a"), 0xd228cb696f1a8caf78912b704e4a8964);
    }

    #[test]
    fn naa_is_stable_and_distinct() {
        let a = naa_designator("disk0");
        assert_eq!(a, naa_designator("disk0"));
        assert_ne!(a, naa_designator("disk1"));
        assert_eq!(a[0] >> 4, 6, "NAA 6");
        // Company ID follows the NAA nibble.
        let v = u128::from_be_bytes(a);
        assert_eq!((v >> 100) & 0xff_ffff, u128::from(NAA_COMPANY_ID));
        assert_eq!(unit_serial("disk0"), unit_serial("disk0"));
        assert_eq!(unit_serial("disk0").len(), 32);
        // Pinned so an accidental change of the derivation shows up here:
        // changing it would change every LU's identity after an upgrade.
        assert_eq!(
            naa_designator("default"),
            [
                0x60, 0x24, 0xc5, 0x7d, 0xd4, 0x5a, 0xdf, 0x05, 0x08, 0x55, 0xb9, 0x18, 0x56, 0x2a,
                0x9e, 0x9b
            ]
        );
        assert_eq!(unit_serial("default"), "dd45adf050855b918562a9e9b69fd699");
    }

    #[test]
    fn standard_inquiry_fields() {
        let d = standard(&identity("x"), PERIPHERAL_DISK);
        assert_eq!(d.len(), 96);
        assert_eq!(d[0], 0);
        assert_eq!(d[2], 6);
        assert_eq!(d[3], 0x12);
        assert_eq!(d[4] as usize, d.len() - 5);
        assert_eq!(d[7] & 0x02, 0x02);
        assert_eq!(&d[8..16], b"LONGWIRE");
        assert_eq!(&d[16..32], b"longwire volume ");
        assert_eq!(&d[58..60], &[0x00, 0xa0]);
        assert_eq!(&d[64..66], &[0x04, 0xc0]);
        let custom = LunIdentity {
            export: "x".into(),
            vendor: "ACME\u{e9}CORPORATION".into(),
            product: "p".into(),
        };
        let d = standard(&custom, PERIPHERAL_NONE);
        assert_eq!(d[0], 0x7f);
        assert_eq!(&d[8..16], b"ACME__CO");
        assert!(d[8..36].iter().all(|b| (0x20..=0x7e).contains(b)));
    }

    #[test]
    fn vpd_pages() {
        let caps = Capabilities {
            can_trim: true,
            can_zero: true,
            ..Capabilities::default()
        };
        let g = Geometry::new(1 << 30, &caps);
        let id = identity("vol");
        let naa = naa_designator("vol");
        let serial = unit_serial("vol");
        let nexus = Nexus {
            initiator_port: "iqn.i,i,0x1".into(),
            target_port: "iqn.2024-01.example:t,t,0x1".into(),
        };
        let src = VpdSource {
            identity: &id,
            geometry: &g,
            naa: &naa,
            serial: &serial,
            nexus: &nexus,
        };
        let sup = vpd(0, &src).unwrap();
        assert_eq!(&sup[4..], &SUPPORTED_VPD_PAGES);
        for &code in &SUPPORTED_VPD_PAGES {
            let p = vpd(code, &src).unwrap();
            assert_eq!(p[1], code);
            assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len() - 4);
        }
        let bl = vpd(0xb0, &src).unwrap();
        assert_eq!(bl.len(), 64);
        assert_eq!(u32::from_be_bytes(bl[8..12].try_into().unwrap()), 65536);
        assert_eq!(
            u32::from_be_bytes(bl[20..24].try_into().unwrap()),
            MAX_UNMAP_LBA_COUNT
        );
        let lbp = vpd(0xb2, &src).unwrap();
        assert_eq!(lbp[5], 0xe4);
        assert_eq!(lbp[6], 0x02);
        let id83 = vpd(0x83, &src).unwrap();
        // First designator: NAA, binary, LU association, 16 bytes.
        assert_eq!(&id83[4..8], &[0x01, 0x03, 0x00, 16]);
        assert_eq!(&id83[8..24], &naa);
        // Walk the designators: lengths must add up exactly.
        let mut pos = 4;
        let mut kinds = Vec::new();
        while pos < id83.len() {
            kinds.push((id83[pos + 1] >> 4 & 3, id83[pos + 1] & 0xf));
            pos += 4 + id83[pos + 3] as usize;
        }
        assert_eq!(pos, id83.len());
        assert_eq!(kinds, vec![(0, 3), (0, 1), (1, 4), (1, 8), (2, 8)]);
        assert_eq!(vpd(0x86, &src), Err(Sense::invalid_cdb(2, None)));
        assert!(vpd_absent(0x00).is_ok());
        assert!(vpd_absent(0x83).is_err());
    }
}
