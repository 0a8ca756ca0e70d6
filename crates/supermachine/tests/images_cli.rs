//! The image commands as a user runs them: `load`, `images`, `rmi`, and
//! one-line errors with a non-zero exit for bad input.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest as _, Sha256};

fn supermachine(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_supermachine"))
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Fails with exactly one line on stderr, naming `what`.
fn fails(out: &Output, what: &str) {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("supermachine: "), "{stderr}");
    assert!(stderr.contains(what), "{stderr} should name {what}");
}

fn append(b: &mut tar::Builder<Vec<u8>>, name: &str, bytes: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(mode);
    b.append_data(&mut h, name, bytes).unwrap();
}

/// A `docker save` archive of a one-file image named `name`.
fn docker_archive(path: &Path, name: &str) {
    let mut layer = tar::Builder::new(Vec::new());
    append(&mut layer, "hello.txt", b"hello from the image\n", 0o644);
    let layer = layer.into_inner().unwrap();
    let diff_id = format!("sha256:{:x}", Sha256::digest(&layer));
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/hello"]}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    );
    let manifest =
        format!(r#"[{{"Config":"config.json","RepoTags":["{name}"],"Layers":["l/layer.tar"]}}]"#);
    let mut archive = tar::Builder::new(Vec::new());
    append(&mut archive, "manifest.json", manifest.as_bytes(), 0o644);
    append(&mut archive, "config.json", config.as_bytes(), 0o644);
    append(&mut archive, "l/layer.tar", &layer, 0o644);
    std::fs::write(path, archive.into_inner().unwrap()).unwrap();
}

#[test]
fn load_list_and_remove_images() {
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let archive = work.path().join("hello.tar");
    docker_archive(&archive, "hello:1");

    let out = ok(&supermachine(&cache, &["load", archive.to_str().unwrap()]));
    assert!(
        out.starts_with("docker.io/library/hello:1 sha256:"),
        "{out}"
    );
    let out = ok(&supermachine(
        &cache,
        &[
            "load",
            archive.to_str().unwrap(),
            "--tag",
            "example.com/hi:2",
        ],
    ));
    assert!(out.starts_with("example.com/hi:2 sha256:"), "{out}");

    let table = ok(&supermachine(&cache, &["images"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("IMAGE") && lines[0].contains("PLATFORM"));
    assert!(lines[1].starts_with("docker.io/library/hello:1") && lines[1].contains("linux/amd64"));

    let json: serde_json::Value =
        serde_json::from_str(&ok(&supermachine(&cache, &["images", "--json"]))).unwrap();
    let list = json.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1]["reference"], "example.com/hi:2");
    // Windows builds no root disk yet: the image is only stored.
    let disk = list[1]["disk"].as_str().map(Path::new);
    if cfg!(unix) {
        assert!(
            disk.is_some_and(Path::is_file),
            "load prepares the root disk"
        );
    } else {
        assert!(disk.is_none(), "{disk:?}");
    }

    let out = ok(&supermachine(&cache, &["rmi", "hello:1"]));
    assert!(
        out.starts_with("removed docker.io/library/hello:1"),
        "{out}"
    );
    // The other name still holds the shared disk.
    assert!(disk.is_none_or(Path::is_file));
    ok(&supermachine(&cache, &["rmi", "example.com/hi:2"]));
    assert!(disk.is_none_or(|d| !d.exists()));
    let json = ok(&supermachine(&cache, &["images", "--json"]));
    assert_eq!(json.trim(), "[]");
}

#[test]
fn bad_input_is_one_line_and_a_failure() {
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    fails(
        &supermachine(&cache, &["rmi", "nothere"]),
        "docker.io/library/nothere:latest",
    );
    fails(
        &supermachine(&cache, &["load", "/no/such/archive.tar"]),
        "/no/such/archive.tar",
    );
    let text = work.path().join("notes.txt");
    std::fs::write(&text, "not an image").unwrap();
    fails(
        &supermachine(&cache, &["load", text.to_str().unwrap()]),
        "notes.txt",
    );
    fails(
        &supermachine(&cache, &["pull", "Not A Reference"]),
        "Not A Reference",
    );
    // Nothing listens on port 1.
    fails(
        &supermachine(&cache, &["pull", "127.0.0.1:1/x:y"]),
        "127.0.0.1:1",
    );
    fails(
        &supermachine(&cache, &["pull", "--platform", "amd64", "alpine"]),
        "linux/amd64",
    );
    let tmp = cache.join("supermachine/oci/tmp");
    assert_eq!(
        std::fs::read_dir(tmp).unwrap().count(),
        0,
        "nothing left behind"
    );
}
