// Temporary measurement probe (not to be committed).
use bytes::Bytes;
use longwire_iscsi::initiator::{Initiator, LoginOptions};
use longwire_iscsi::pdu::{self, Pdu};
use std::time::Duration;

fn rss(pid: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM")).map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect::<Vec<_>>().join(", ")
}

fn rw16(op: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let addr = a[1].parse().unwrap();
    let pid = &a[2];
    let n: usize = a[3].parse().unwrap();
    let len: usize = 32 << 20;
    let blocks = (len / 512) as u32;
    let o = LoginOptions::normal("iqn.2026-11.dev.longwire.test:probe", "iqn.2026-11.dev.longwire:disk").key("MaxBurstLength", "1048576");
    let mut i = Initiator::connect(addr).unwrap();
    i.login(&o).unwrap();
    let data: Vec<u8> = (0..len).map(|x| (x * 7 + x / 251) as u8).collect();
    let w = i.command(0, &rw16(0x8a, 0, blocks), 0, &data).unwrap();
    assert_eq!(w.status, 0);
    println!("after write: {}", rss(pid));
    let mut itts = Vec::new();
    for _ in 0..n {
        let itt = i.next_itt();
        let cmd_sn = i.next_cmd_sn();
        i.send(&Pdu::ScsiCommand(pdu::ScsiCommand {
            final_: true, read: true, itt, expected_len: len as u32, cmd_sn, exp_stat_sn: i.exp_stat_sn,
            cdb: Bytes::from(rw16(0x88, 0, blocks)), ..Default::default()
        })).unwrap();
        itts.push(itt);
    }
    for s in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        println!("{}s stalled with {n} x 32 MiB reads: {}", s + 1, rss(pid));
    }
    let mut got = std::collections::HashMap::<u32, Vec<u8>>::new();
    let mut done = 0;
    while done < n {
        match i.recv().unwrap() {
            Pdu::DataIn(d) => {
                let b = got.entry(d.itt).or_default();
                b.extend_from_slice(&d.data);
                if d.has_status { assert_eq!(d.status, 0); done += 1; assert!(*b == data); got.remove(&d.itt); }
            }
            other => panic!("{other:?}"),
        }
    }
    println!("all {n} reads received and correct: {}", rss(pid));
}
