//! MODE SENSE and MODE SELECT (SPC-4 6.11-6.14, 7.5; SBC-3 6.4).
//!
//! Three pages: Caching (08h), Control (0Ah) and Informational Exceptions
//! Control (1Ch). Two fields can be changed: WCE (turning it off makes
//! every write FUA) and SWP (software write protect). Nothing is saved:
//! PC=saved and SP=1 are refused.

use super::cdb::BLOCK_SIZE;
use super::geometry::Geometry;
use super::sense::{self, Sense};

/// The changeable mode parameters of one logical unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeState {
    /// Write cache enable: writes may sit in a volatile cache until
    /// SYNCHRONIZE CACHE. When clear, every write is made durable (FUA).
    pub wce: bool,
    /// Software write protect: the logical unit refuses medium changes.
    pub swp: bool,
}

impl ModeState {
    /// Power-on values.
    pub fn defaults(g: &Geometry) -> ModeState {
        ModeState {
            wce: g.volatile_cache,
            swp: false,
        }
    }
}

/// Page control values (SPC-4 6.11.1).
const PC_CURRENT: u8 = 0;
const PC_CHANGEABLE: u8 = 1;
const PC_DEFAULT: u8 = 2;

const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0a;
const PAGE_IEC: u8 = 0x1c;
const ALL_PAGES: u8 = 0x3f;
const ALL_SUBPAGES: u8 = 0xff;

/// Pages in the order "all pages" returns them.
const PAGES: [u8; 3] = [PAGE_CACHING, PAGE_CONTROL, PAGE_IEC];

/// Which values a page is rendered with.
#[derive(Debug, Clone, Copy)]
enum View {
    Values(ModeState),
    Changeable,
}

/// One mode page (with its two-byte header), or None if we do not have it.
fn render(code: u8, g: &Geometry, view: View) -> Option<Vec<u8>> {
    let mut p = match code {
        PAGE_CACHING => vec![0u8; 20],
        PAGE_CONTROL => vec![0u8; 12],
        PAGE_IEC => vec![0u8; 12],
        _ => return None,
    };
    p[0] = code;
    p[1] = (p.len() - 2) as u8;
    match (code, view) {
        (PAGE_CACHING, View::Values(s)) if s.wce => p[2] |= 0x04,
        (PAGE_CACHING, View::Changeable) if g.volatile_cache => p[2] |= 0x04,
        (PAGE_CONTROL, View::Values(s)) => {
            p[2] = 0x02; // GLTSD: no log parameters are saved
            p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
            if s.swp {
                p[4] |= 0x08;
            }
            p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // BUSY TIMEOUT: unlimited
        }
        (PAGE_CONTROL, View::Changeable) if !g.read_only => p[4] |= 0x08, // SWP
        (PAGE_IEC, View::Values(_)) => p[2] = 0x08, // DEXCPT: no exception reporting
        _ => {}
    }
    Some(p)
}

/// Fields of a MODE SENSE CDB.
#[derive(Debug, Clone, Copy)]
pub struct SenseRequest {
    pub ten: bool,
    pub dbd: bool,
    pub llbaa: bool,
    pub pc: u8,
    pub page: u8,
    pub subpage: u8,
}

/// MODE SENSE(6)/(10) parameter data, complete (the caller truncates it to
/// the allocation length).
pub fn mode_sense(
    req: &SenseRequest,
    g: &Geometry,
    current: ModeState,
    write_protected: bool,
) -> Result<Vec<u8>, Sense> {
    let view = match req.pc {
        PC_CURRENT => View::Values(current),
        PC_CHANGEABLE => View::Changeable,
        PC_DEFAULT => View::Values(ModeState::defaults(g)),
        _ => return Err(sense::SAVING_PARAMETERS_NOT_SUPPORTED),
    };
    if req.subpage != 0 && req.subpage != ALL_SUBPAGES {
        return Err(Sense::invalid_cdb(3, None));
    }
    let mut pages = Vec::new();
    if req.page == ALL_PAGES {
        for code in PAGES {
            pages.extend(render(code, g, view).unwrap_or_default());
        }
    } else {
        match render(req.page, g, view) {
            Some(p) => pages.extend(p),
            None => return Err(Sense::invalid_cdb(2, Some(5))),
        }
    }

    let mut bd = Vec::new();
    if !req.dbd {
        if req.llbaa {
            bd.extend_from_slice(&g.num_blocks.to_be_bytes());
            bd.extend_from_slice(&[0; 4]);
            bd.extend_from_slice(&BLOCK_SIZE.to_be_bytes());
        } else {
            let n = u32::try_from(g.num_blocks).unwrap_or(u32::MAX);
            bd.extend_from_slice(&n.to_be_bytes());
            bd.push(0);
            bd.extend_from_slice(&BLOCK_SIZE.to_be_bytes()[1..]);
        }
    }

    let mut dsp = 0x10; // DPOFUA: DPO and FUA are accepted
    if write_protected {
        dsp |= 0x80; // WP
    }
    let mut out = Vec::new();
    if req.ten {
        let total = 8 + bd.len() + pages.len();
        out.extend_from_slice(&((total - 2) as u16).to_be_bytes());
        out.push(0); // medium type
        out.push(dsp);
        out.push(u8::from(req.llbaa && !req.dbd)); // LONGLBA
        out.push(0);
        out.extend_from_slice(&(bd.len() as u16).to_be_bytes());
    } else {
        let total = 4 + bd.len() + pages.len();
        out.push((total - 1) as u8);
        out.push(0);
        out.push(dsp);
        out.push(bd.len() as u8);
    }
    out.extend(bd);
    out.extend(pages);
    Ok(out)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Validate a MODE SELECT(6)/(10) parameter list and return the mode state
/// it asks for. Every page must match what MODE SENSE reports except in
/// changeable fields; nothing is applied unless the whole list is valid.
pub fn mode_select(
    ten: bool,
    pf: bool,
    list: &[u8],
    g: &Geometry,
    current: ModeState,
) -> Result<ModeState, Sense> {
    let len_err = sense::PARAMETER_LIST_LENGTH_ERROR;
    if list.is_empty() {
        return Ok(current);
    }
    let (hdr, medium_at, bd_len, long_lba) = if ten {
        let b = list.get(..8).ok_or(len_err)?;
        (
            8usize,
            2usize,
            usize::from(be16(b, 6).unwrap_or(0)),
            b[4] & 0x01 != 0,
        )
    } else {
        let b = list.get(..4).ok_or(len_err)?;
        (4, 1, usize::from(b[3]), false)
    };
    if list.get(medium_at).copied().unwrap_or(0) != 0 {
        return Err(Sense::invalid_param(medium_at as u16, None));
    }
    let bd_len_at: u16 = if ten { 6 } else { 3 };
    let want_bd = if long_lba { 16 } else { 8 };
    if bd_len != 0 && bd_len != want_bd {
        return Err(Sense::invalid_param(bd_len_at, None));
    }
    let bd = list.get(hdr..hdr + bd_len).ok_or(len_err)?;
    if !bd.is_empty() {
        // Capacity and block size cannot be changed: accept them restated
        // (or a zero block count, which means "unchanged").
        let (blocks, len, len_at, expected) = if long_lba {
            (
                be64(bd, 0).unwrap_or(0),
                be32(bd, 12).unwrap_or(0),
                12,
                g.num_blocks,
            )
        } else {
            let l = u32::from_be_bytes([0, bd[5], bd[6], bd[7]]);
            let n = be32(bd, 0).unwrap_or(0);
            (u64::from(n), l, 5, g.num_blocks.min(u64::from(u32::MAX)))
        };
        if len != BLOCK_SIZE {
            return Err(Sense::invalid_param((hdr + len_at) as u16, None));
        }
        if blocks != 0 && blocks != expected {
            return Err(Sense::invalid_param(hdr as u16, None));
        }
    }

    let mut next = current;
    let mut pos = hdr + bd_len;
    while pos < list.len() {
        if !pf {
            // Pages in the SCSI-1 vendor format: not ours to interpret.
            return Err(Sense::invalid_cdb(1, Some(4)));
        }
        let b0 = list[pos];
        if b0 & 0x40 != 0 {
            // Sub-page format: we have no subpages.
            return Err(Sense::invalid_param(pos as u16, Some(6)));
        }
        let code = b0 & 0x3f;
        let plen = usize::from(*list.get(pos + 1).ok_or(len_err)?);
        let body = list.get(pos..pos + 2 + plen).ok_or(len_err)?;
        let (Some(cur), Some(mask)) = (
            render(code, g, View::Values(next)),
            render(code, g, View::Changeable),
        ) else {
            return Err(Sense::invalid_param(pos as u16, Some(5)));
        };
        if body.len() != cur.len() {
            return Err(Sense::invalid_param((pos + 1) as u16, None));
        }
        for i in 2..body.len() {
            let bad = (body[i] ^ cur[i]) & !mask[i];
            if bad != 0 {
                let bit = 7 - bad.leading_zeros() as u8;
                return Err(Sense::invalid_param((pos + i) as u16, Some(bit)));
            }
        }
        match code {
            PAGE_CACHING => next.wce = body[2] & 0x04 != 0,
            PAGE_CONTROL => next.swp = body[4] & 0x08 != 0,
            _ => {}
        }
        pos += 2 + plen;
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use longwire_core::Capabilities;

    fn geometry() -> Geometry {
        Geometry::new(1 << 30, &Capabilities::default())
    }

    fn req(ten: bool, pc: u8, page: u8) -> SenseRequest {
        SenseRequest {
            ten,
            dbd: false,
            llbaa: false,
            pc,
            page,
            subpage: 0,
        }
    }

    #[test]
    fn all_pages_six_byte() {
        let g = geometry();
        let s = ModeState::defaults(&g);
        let d = mode_sense(&req(false, 0, 0x3f), &g, s, false).unwrap();
        assert_eq!(d[0] as usize, d.len() - 1);
        assert_eq!(d[2], 0x10, "DPOFUA, not WP");
        assert_eq!(d[3], 8);
        assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), 1 << 21);
        assert_eq!(&d[9..12], &[0, 2, 0]);
        // Caching page with WCE=1, then control, then IEC.
        assert_eq!(&d[12..15], &[0x08, 0x12, 0x04]);
        assert_eq!(&d[32..34], &[0x0a, 0x0a]);
        assert_eq!(&d[44..46], &[0x1c, 0x0a]);
        assert_eq!(d.len(), 56);
    }

    #[test]
    fn ten_byte_long_lba_and_dbd() {
        let g = geometry();
        let s = ModeState::defaults(&g);
        let mut r = req(true, 0, PAGE_CONTROL);
        r.llbaa = true;
        let d = mode_sense(&r, &g, s, true).unwrap();
        assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
        assert_eq!(d[3], 0x90, "WP and DPOFUA");
        assert_eq!(d[4], 1, "LONGLBA");
        assert_eq!(u16::from_be_bytes([d[6], d[7]]), 16);
        assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 1 << 21);
        assert_eq!(d[24], 0x0a);
        r.dbd = true;
        let d = mode_sense(&r, &g, s, false).unwrap();
        assert_eq!(d[4], 0);
        assert_eq!(&d[6..8], &[0, 0]);
        assert_eq!(d[8], 0x0a);
    }

    #[test]
    fn page_control_and_errors() {
        let g = geometry();
        let s = ModeState::defaults(&g);
        let ch = mode_sense(&req(false, 1, PAGE_CONTROL), &g, s, false).unwrap();
        assert_eq!(ch[12 + 4], 0x08, "SWP is changeable");
        assert_eq!(
            mode_sense(&req(false, 3, 0x3f), &g, s, false),
            Err(sense::SAVING_PARAMETERS_NOT_SUPPORTED)
        );
        assert_eq!(
            mode_sense(&req(false, 0, 0x19), &g, s, false),
            Err(Sense::invalid_cdb(2, Some(5)))
        );
        let mut r = req(false, 0, 0x3f);
        r.subpage = 1;
        assert_eq!(
            mode_sense(&r, &g, s, false),
            Err(Sense::invalid_cdb(3, None))
        );
        r.subpage = 0xff;
        assert!(mode_sense(&r, &g, s, false).is_ok());
    }

    /// A MODE SELECT(6) list with one page, like libiscsi builds it.
    fn select6(page: &[u8]) -> Vec<u8> {
        let mut l = vec![0, 0, 0, 0];
        l.extend_from_slice(page);
        l
    }

    #[test]
    fn select_round_trips_and_changes_swp_and_wce() {
        let g = geometry();
        let s = ModeState::defaults(&g);
        let mut control = render(PAGE_CONTROL, &g, View::Values(s)).unwrap();
        assert_eq!(mode_select(false, true, &select6(&control), &g, s), Ok(s));
        control[4] |= 0x08;
        let n = mode_select(false, true, &select6(&control), &g, s).unwrap();
        assert!(n.swp && n.wce);
        let mut caching = render(PAGE_CACHING, &g, View::Values(s)).unwrap();
        caching[2] = 0;
        let n = mode_select(false, true, &select6(&caching), &g, s).unwrap();
        assert!(!n.wce);
    }

    #[test]
    fn select_rejects_unchangeable_fields() {
        let g = geometry();
        let s = ModeState::defaults(&g);
        let mut control = render(PAGE_CONTROL, &g, View::Values(s)).unwrap();
        control[3] = 0; // QUEUE ALGORITHM MODIFIER
        assert_eq!(
            mode_select(false, true, &select6(&control), &g, s),
            Err(Sense::invalid_param(7, Some(4)))
        );
        // Wrong page length.
        let mut short = render(PAGE_IEC, &g, View::Values(s)).unwrap();
        short[1] = 9;
        short.pop();
        assert_eq!(
            mode_select(false, true, &select6(&short), &g, s),
            Err(Sense::invalid_param(5, None))
        );
        // Unknown page.
        assert_eq!(
            mode_select(false, true, &select6(&[0x19, 0x02, 0, 0]), &g, s),
            Err(Sense::invalid_param(4, Some(5)))
        );
        // Page runs past the end of the list.
        assert_eq!(
            mode_select(false, true, &select6(&[0x08, 0x12, 0]), &g, s),
            Err(sense::PARAMETER_LIST_LENGTH_ERROR)
        );
        // PF=0 with pages.
        let control = render(PAGE_CONTROL, &g, View::Values(s)).unwrap();
        assert_eq!(
            mode_select(false, false, &select6(&control), &g, s),
            Err(Sense::invalid_cdb(1, Some(4)))
        );
        // Header only, too short.
        assert_eq!(
            mode_select(true, true, &[0, 0, 0], &g, s),
            Err(sense::PARAMETER_LIST_LENGTH_ERROR)
        );
    }

    #[test]
    fn select_block_descriptor() {
        let g = geometry();
        let s = ModeState::defaults(&g);
        let mut l = vec![0, 0, 0, 8];
        l.extend_from_slice(&(1u32 << 21).to_be_bytes());
        l.extend_from_slice(&[0, 0, 2, 0]);
        assert_eq!(mode_select(false, true, &l, &g, s), Ok(s));
        l[10] = 0x10; // 4096-byte blocks
        assert_eq!(
            mode_select(false, true, &l, &g, s),
            Err(Sense::invalid_param(9, None))
        );
        l[10] = 2;
        l[7] = 1; // different capacity
        assert_eq!(
            mode_select(false, true, &l, &g, s),
            Err(Sense::invalid_param(4, None))
        );
        l[3] = 7;
        assert_eq!(
            mode_select(false, true, &l, &g, s),
            Err(Sense::invalid_param(3, None))
        );
    }

    #[test]
    fn read_only_swp_is_not_changeable() {
        let g = Geometry::new(
            1 << 20,
            &Capabilities {
                read_only: true,
                can_flush: false,
                ..Capabilities::default()
            },
        );
        let s = ModeState::defaults(&g);
        assert!(!s.wce);
        let mut control = render(PAGE_CONTROL, &g, View::Values(s)).unwrap();
        control[4] |= 0x08;
        assert!(mode_select(false, true, &select6(&control), &g, s).is_err());
    }
}
