//! Layers applied to a directory: the OCI semantics, and every way a
//! hostile layer tries to write outside it.
#![allow(clippy::unwrap_used)]
// Layers are unpacked onto a POSIX file system; Windows has no unpacker.
#![cfg(unix)]

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use supermachine_oci::{Compression, Error, Limits, Unpacker};

/// One tar entry, written byte by byte so that hostile names survive
/// (the tar crate's own builder refuses them).
struct Entry {
    name: &'static str,
    kind: u8,
    link: &'static str,
    data: Vec<u8>,
    mode: u32,
    uid: u64,
    pax: Vec<(&'static str, Vec<u8>)>,
}

fn file(name: &'static str, data: &[u8]) -> Entry {
    Entry {
        name,
        kind: b'0',
        link: "",
        data: data.to_vec(),
        mode: 0o644,
        uid: 0,
        pax: Vec::new(),
    }
}

fn dir(name: &'static str) -> Entry {
    Entry {
        kind: b'5',
        mode: 0o755,
        ..file(name, b"")
    }
}

fn symlink(name: &'static str, target: &'static str) -> Entry {
    Entry {
        kind: b'2',
        link: target,
        mode: 0o777,
        ..file(name, b"")
    }
}

fn hardlink(name: &'static str, target: &'static str) -> Entry {
    Entry {
        kind: b'1',
        link: target,
        ..file(name, b"")
    }
}

fn header(name: &[u8], kind: u8, link: &[u8], size: u64, mode: u32, uid: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
        let s = format!("{v:0width$o}", width = len - 1);
        h[at..at + len - 1].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, u64::from(mode));
    octal(&mut h, 108, 8, uid);
    octal(&mut h, 116, 8, uid);
    octal(&mut h, 124, 12, size);
    octal(&mut h, 136, 12, 1_700_000_000);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(512) {
        out.push(0);
    }
}

fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        if !e.pax.is_empty() {
            let mut records = Vec::new();
            for (k, v) in &e.pax {
                let body_len = k.len() + v.len() + 3;
                let mut len = body_len + 1;
                while format!("{len}").len() + body_len != len {
                    len += 1;
                }
                records.extend_from_slice(format!("{len} {k}=").as_bytes());
                records.extend_from_slice(v);
                records.push(b'\n');
            }
            out.extend_from_slice(&header(b"pax", b'x', b"", records.len() as u64, 0o644, 0));
            out.extend_from_slice(&records);
            pad(&mut out);
        }
        out.extend_from_slice(&header(
            e.name.as_bytes(),
            e.kind,
            e.link.as_bytes(),
            e.data.len() as u64,
            e.mode,
            e.uid,
        ));
        out.extend_from_slice(&e.data);
        pad(&mut out);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// A target directory inside a sandbox: anything that escapes the target
/// lands in the sandbox, where the test sees it.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("root")).unwrap();
        fs::create_dir_all(dir.path().join("outside")).unwrap();
        fs::write(dir.path().join("outside/precious"), b"keep").unwrap();
        Self { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn unpacker(&self, limits: Limits) -> Unpacker {
        Unpacker::new(&self.root(), limits).unwrap()
    }
    /// Everything in the sandbox outside the target, as relative paths.
    fn outside(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p == self.root() {
                    continue;
                }
                found.push(p.strip_prefix(self.dir.path()).unwrap().to_path_buf());
                if e.file_type().unwrap().is_dir() {
                    stack.push(p);
                }
            }
        }
        found.sort();
        found
    }
    fn assert_nothing_escaped(&self) {
        assert_eq!(
            self.outside(),
            vec![PathBuf::from("outside"), PathBuf::from("outside/precious")]
        );
        assert_eq!(
            fs::read(self.dir.path().join("outside/precious")).unwrap(),
            b"keep"
        );
    }
}

fn apply(u: &mut Unpacker, name: &str, entries: &[Entry]) -> Result<(), Error> {
    u.apply(name, &tar(entries)[..], Compression::None, None)
}

#[test]
fn layers_apply_in_order_with_whiteouts_and_opaque_directories() {
    let s = Sandbox::new();
    let mut u = s.unpacker(Limits::default());
    apply(
        &mut u,
        "base",
        &[
            dir("etc"),
            file("etc/a", b"a"),
            file("etc/b", b"b"),
            dir("opt/x"),
            file("opt/x/old", b"old"),
            file("./replaced", b"file"),
        ],
    )
    .unwrap();
    apply(
        &mut u,
        "top",
        &[
            file("etc/.wh.a", b""),
            dir("opt/x"),
            file("opt/x/.wh..wh..opq", b""),
            file("opt/x/new", b"new"),
            dir("replaced"),
            file("replaced/inside", b"i"),
        ],
    )
    .unwrap();
    u.finish().unwrap();
    let r = s.root();
    assert!(!r.join("etc/a").exists(), "whiteout removed etc/a");
    assert!(!r.join("etc/.wh.a").exists(), "whiteouts are not files");
    assert_eq!(fs::read(r.join("etc/b")).unwrap(), b"b");
    assert!(
        !r.join("opt/x/old").exists(),
        "opaque directory hides the lower layer"
    );
    assert!(!r.join("opt/x/.wh..wh..opq").exists());
    assert_eq!(fs::read(r.join("opt/x/new")).unwrap(), b"new");
    assert!(r.join("replaced").is_dir(), "a directory replaces a file");
    s.assert_nothing_escaped();
}

#[test]
fn modes_links_xattrs_times_and_owners_are_kept() {
    let s = Sandbox::new();
    let mut u = s.unpacker(Limits::default());
    let setuid = Entry {
        mode: 0o4755,
        uid: 1234,
        pax: vec![("SCHILY.xattr.user.supermachine", b"yes".to_vec())],
        ..file("bin/tool", b"#!/bin/sh\n")
    };
    apply(
        &mut u,
        "meta",
        &[
            setuid,
            symlink("bin/alias", "tool"),
            hardlink("bin/same", "bin/tool"),
            Entry {
                kind: b'3',
                ..file("dev/null", b"")
            },
        ],
    )
    .unwrap();
    let fixups = u.finish().unwrap();
    let r = s.root();
    let meta = fs::metadata(r.join("bin/tool")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(meta.mtime(), 1_700_000_000);
    assert_eq!(
        fs::read_link(r.join("bin/alias")).unwrap(),
        Path::new("tool")
    );
    assert_eq!(fs::metadata(r.join("bin/same")).unwrap().ino(), meta.ino());
    assert!(!r.join("dev/null").exists(), "device nodes are skipped");
    if rustix::process::geteuid().is_root() {
        assert_eq!(meta.uid(), 1234);
        assert!(fixups.is_empty(), "{fixups:?}");
    } else {
        assert_eq!(fixups[Path::new("bin/tool")].owner, Some((1234, 1234)));
    }
    match rustix::fs::getxattr(r.join("bin/tool"), "user.supermachine", &mut [0u8; 16]) {
        Ok(n) => assert_eq!(n, 3),
        // Some file systems (tmpfs without user xattrs) refuse them; then
        // the xattr must be kept for the disk image.
        Err(_) => assert!(!fixups[Path::new("bin/tool")].xattrs.is_empty()),
    }
}

#[test]
fn absolute_symlinks_resolve_inside_the_image_root() {
    let s = Sandbox::new();
    let mut u = s.unpacker(Limits::default());
    // `etc` points at the host's /etc by its text; inside the image it
    // means the image's own /etc, and that is where the file must go.
    apply(
        &mut u,
        "abs",
        &[
            dir("real-etc"),
            symlink("etc", "/real-etc"),
            file("etc/passwd", b"root:x:0:0::/:/bin/sh\n"),
        ],
    )
    .unwrap();
    assert!(s.root().join("real-etc/passwd").is_file());
    s.assert_nothing_escaped();
}

fn assert_refused(result: Result<(), Error>, entry: &str, reason: &str) {
    match result {
        Err(Error::Unpack {
            layer,
            entry: e,
            reason: r,
        }) => {
            assert_eq!(layer, "evil", "the layer is named");
            assert!(e.contains(entry), "entry {e:?} should name {entry:?}");
            assert!(r.contains(reason), "reason {r:?} should say {reason:?}");
        }
        other => panic!("expected a refusal of {entry}, got {other:?}"),
    }
}

#[test]
fn hostile_entries_are_refused_and_nothing_is_written_outside() {
    let cases: Vec<(Vec<Entry>, &str, &str)> = vec![
        (
            vec![file("../outside/evil", b"x")],
            "../outside/evil",
            "`..`",
        ),
        (
            vec![file("a/../../outside/evil", b"x")],
            "a/../../outside/evil",
            "`..`",
        ),
        (
            vec![file("/outside/evil", b"x")],
            "/outside/evil",
            "absolute",
        ),
        (
            vec![symlink("up", "../outside"), file("up/evil", b"x")],
            "up/evil",
            "leads out of the image root",
        ),
        (
            vec![
                dir("d"),
                symlink("d/up", "../../outside"),
                file("d/up/precious", b"x"),
            ],
            "d/up/precious",
            "leads out of the image root",
        ),
        (
            vec![hardlink("h", "../outside/precious")],
            "h",
            "outside the image root",
        ),
        (
            vec![hardlink("h", "/outside/precious")],
            "h",
            "does not exist",
        ),
        (
            vec![symlink("a", "b"), symlink("b", "a"), file("a/x", b"x")],
            "a/x",
            "symlink loop",
        ),
        (vec![file("x/.wh.", b"")], "x/.wh.", "no name"),
    ];
    for (entries, entry, reason) in cases {
        let s = Sandbox::new();
        let mut u = s.unpacker(Limits::default());
        assert_refused(apply(&mut u, "evil", &entries), entry, reason);
        s.assert_nothing_escaped();
    }
}

#[test]
fn a_symlink_planted_by_an_earlier_layer_cannot_redirect_a_later_one() {
    let s = Sandbox::new();
    let mut u = s.unpacker(Limits::default());
    apply(&mut u, "base", &[symlink("var", "../outside")]).unwrap();
    assert_refused(
        apply(&mut u, "evil", &[file("var/precious", b"overwritten")]),
        "var/precious",
        "leads out of the image root",
    );
    s.assert_nothing_escaped();
}

#[test]
fn a_tar_bomb_is_stopped_at_the_limit() {
    let s = Sandbox::new();
    let limits = Limits {
        max_bytes: 1 << 20,
        ..Limits::default()
    };
    let mut u = s.unpacker(limits);
    let bomb = gzip(&tar(&[file("zeros", &vec![0u8; 4 << 20])]));
    assert!(bomb.len() < 64 << 10, "it is a bomb: {} bytes", bomb.len());
    let r = u.apply("evil", &bomb[..], Compression::Gzip, None);
    assert_refused(r, "zeros", "more than 1048576 bytes");

    let s = Sandbox::new();
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    let mut u = s.unpacker(limits);
    let many: Vec<Entry> = (0..20).map(|_| dir("d")).collect();
    assert_refused(apply(&mut u, "evil", &many), "d", "more than 10 entries");
}

#[test]
fn a_truncated_gzip_stream_is_refused() {
    let s = Sandbox::new();
    let mut u = s.unpacker(Limits::default());
    let whole = gzip(&tar(&[file("big", &Sha256::digest(b"x").repeat(8192))]));
    let cut = &whole[..whole.len() - 16];
    match u.apply("evil", cut, Compression::Gzip, None) {
        Err(Error::Unpack { layer, reason, .. }) => {
            assert_eq!(layer, "evil");
            assert!(reason.contains("reading the layer"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn zstd_layers_and_diff_ids_are_checked() {
    let s = Sandbox::new();
    let mut u = s.unpacker(Limits::default());
    let raw = tar(&[file("hello", b"world")]);
    let diff_id = format!("sha256:{}", supermachine_oci::Digest::sha256_of(&raw).hex());
    let z = common::zstd_compress(&raw);
    assert_eq!(Compression::sniff(&z), Compression::Zstd);
    u.apply("z", &z[..], Compression::Zstd, Some(&diff_id))
        .unwrap();
    assert_eq!(fs::read(s.root().join("hello")).unwrap(), b"world");

    let wrong = format!("sha256:{}", "0".repeat(64));
    match u.apply("evil", &raw[..], Compression::None, Some(&wrong)) {
        Err(Error::Unpack { reason, .. }) => {
            assert!(reason.contains("image config says"), "{reason}")
        }
        other => panic!("expected a diff_id refusal, got {other:?}"),
    }
}
