//! Costream and splicer against the reference outputs of the golden cases: identical
//! type-4 files, raw keys and log lines. Skips (with a message) where the cases are absent.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use qkd_coincidences::{
    splice, Costream, CostreamConfig, CostreamFolders, Need, SplicerProtocol, ZeroPolicy,
};

fn golden_root() -> PathBuf {
    match std::env::var_os("QKD_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden"),
    }
}

/// Returns the option values of the first command line of `program` in commands.log.
fn options(case: &Path, program: &str) -> BTreeMap<String, String> {
    let log = fs::read_to_string(case.join("commands.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.starts_with(&format!("{program} ")))
        .unwrap_or_else(|| panic!("no {program} line in commands.log"));
    let tokens: Vec<&str> = line.split_whitespace().skip(1).collect();
    let mut out = BTreeMap::new();
    for pair in tokens.chunks(2) {
        out.insert(pair[0].to_string(), pair[1].to_string());
    }
    out
}

fn number(options: &BTreeMap<String, String>, key: &str) -> i64 {
    let text = &options[key];
    match text.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).unwrap(),
        None => text.parse().unwrap(),
    }
}

fn sorted_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn run_costream_case(name: &str) {
    let case = golden_root().join(name);
    if !case.is_dir() {
        eprintln!("golden case {} not found; skipped", case.display());
        return;
    }
    let o = options(&case, "costream");
    let config = CostreamConfig {
        start_epoch: number(&o, "-e") as u32,
        epoch_count: number(&o, "-q") as u32,
        time_offset: number(&o, "-t"),
        coincidence_window: number(&o, "-w"),
        tracking_window: number(&o, "-u"),
        track_filter: number(&o, "-Q"),
        protocol: number(&o, "-p"),
        width_filter: number(&o, "-R") as i32,
        zero_policy: match number(&o, "-T") {
            0 => ZeroPolicy::NoFiles,
            1 => ZeroPolicy::Type4Only,
            _ => ZeroPolicy::BothFiles,
        },
        ..CostreamConfig::default()
    };
    let out = tempfile::tempdir().unwrap();
    let folders = CostreamFolders {
        type1: case.join("t1"),
        type2: case.join("t2"),
        type3: out.path().join("rawkey"),
        type4: out.path().join("t4"),
        type5: None,
        delete_type1: false,
        delete_type2: false,
    };
    fs::create_dir(&folders.type3).unwrap();
    fs::create_dir(&folders.type4).unwrap();
    let mut costream = Costream::new(config).unwrap();
    let (closed, need) = folders.step(&mut costream).unwrap();
    assert_eq!(need, Need::Done);

    let verbosity = number(&o, "-V") as i32;
    let log: String = closed
        .iter()
        .map(|e| e.log_line(verbosity).unwrap())
        .collect();
    let expected_log = fs::read_to_string(case.join(&o["-n"])).unwrap();
    assert_eq!(log, expected_log, "{name}: costream log differs");

    assert!(
        sorted_files(&folders.type4) == sorted_files(&case.join("t4")),
        "{name}: type-4 files differ"
    );
    assert!(
        sorted_files(&folders.type3) == sorted_files(&case.join(&o["-f"])),
        "{name}: raw keys of the high-count side differ"
    );
}

fn run_splicer_case(name: &str) {
    let case = golden_root().join(name);
    if !case.is_dir() {
        eprintln!("golden case {} not found; skipped", case.display());
        return;
    }
    let o = options(&case, "splicer");
    let protocol = SplicerProtocol::new(number(&o, "-p")).unwrap();
    let start = number(&o, "-e") as u32;
    let verbosity = number(&o, "-V") as i32;
    let mut log = String::new();
    let mut keys = Vec::new();
    for k in 0..number(&o, "-q") as u32 {
        let epoch = start + k;
        let file = format!("{epoch:08x}");
        let t3 = fs::read(case.join(&o["-d"]).join(&file)).unwrap();
        let t4 = fs::read(case.join(&o["-D"]).join(&file)).unwrap();
        let spliced = splice(epoch, &t3, &t4, &protocol, false).unwrap();
        log.push_str(&spliced.log_line(verbosity).unwrap());
        keys.push((file, spliced.type3));
    }
    let expected_log = fs::read_to_string(case.join(&o["-m"])).unwrap();
    assert_eq!(log, expected_log, "{name}: splicer log differs");
    assert!(
        keys == sorted_files(&case.join(&o["-f"])),
        "{name}: raw keys of the low-count side differ"
    );
}

#[test]
fn costream_tiny() {
    run_costream_case("tiny");
}

#[test]
fn costream_realistic() {
    run_costream_case("realistic");
}

#[test]
fn costream_noisy() {
    run_costream_case("noisy");
}

#[test]
fn costream_fail() {
    run_costream_case("fail");
}

#[test]
fn splicer_tiny() {
    run_splicer_case("tiny");
}

#[test]
fn splicer_realistic() {
    run_splicer_case("realistic");
}

#[test]
fn splicer_noisy() {
    run_splicer_case("noisy");
}

#[test]
fn splicer_fail() {
    run_splicer_case("fail");
}
