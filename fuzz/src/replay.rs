// Corpus replay for CI, shared by crates/longwire-nbd/tests/fuzz_corpus.rs
// and crates/longwire-iscsi/tests/fuzz_corpus.rs (both `include!` it next
// to their harness file). Not part of the fuzz crate's own build.

/// Corpus seeds and fixed crash reproducers of `target`: every file in
/// fuzz/corpus/<target>/ and fuzz/artifacts/<target>/crash-*. Files in
/// fuzz/known-crashes/ (reproducers of bugs not fixed yet) are not read.
fn replay_inputs(target: &str) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files = Vec::new();
    for (dir, crashes_only) in [(root.join("corpus").join(target), false), (root.join("artifacts").join(target), true)] {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if !p.is_file() || (crashes_only && !name.starts_with("crash-")) {
                continue;
            }
            files.push(p);
        }
    }
    files.sort();
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

/// Run `harness` on every corpus file of `target` (at least `min_seeds`
/// must exist, so a moved corpus is noticed), naming the file on panic.
fn replay(target: &str, min_seeds: usize, harness: fn(&[u8])) {
    let inputs = replay_inputs(target);
    assert!(inputs.len() >= min_seeds, "only {} corpus files for {target}", inputs.len());
    for (path, data) in inputs {
        let r = std::panic::catch_unwind(|| harness(&data));
        if let Err(e) = r {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("{target}: {} panics: {msg:?}", path.display());
        }
    }
}

/// Deterministic xorshift64* stream.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Run `harness` on `count` pseudo-random inputs: plain random bytes, and
/// mutations (byte flips, truncation, splicing) of the corpus seeds, so the
/// test has teeth even if the corpus is thin.
fn random_inputs(target: &str, count: usize, max_len: usize, harness: fn(&[u8])) {
    let seeds: Vec<Vec<u8>> = replay_inputs(target).into_iter().map(|(_, d)| d).collect();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    for i in 0..count {
        let input: Vec<u8> = if seeds.is_empty() || i % 2 == 0 {
            let len = (rng.next() as usize) % (max_len + 1);
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            let mut v = seeds[(rng.next() as usize) % seeds.len()].clone();
            let flips = 1 + rng.next() % 8;
            for _ in 0..flips {
                if v.is_empty() {
                    break;
                }
                let at = (rng.next() as usize) % v.len();
                match rng.next() % 4 {
                    0 => v[at] ^= 1 << (rng.next() % 8),
                    1 => v[at] = rng.next() as u8,
                    2 => v.truncate(at),
                    _ => {
                        let other = &seeds[(rng.next() as usize) % seeds.len()];
                        let from = (rng.next() as usize) % (other.len() + 1);
                        v.extend_from_slice(&other[from..]);
                    }
                }
            }
            v
        };
        let r = std::panic::catch_unwind(|| harness(&input));
        if let Err(e) = r {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            panic!("{target}: pseudo-random input #{i} panics: {msg:?}\ninput hex: {hex}");
        }
    }
}
