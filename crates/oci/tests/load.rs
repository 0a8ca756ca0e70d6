//! Importing local images: `docker save` archives and `oci-archive`
//! tarballs written by skopeo (a real producer), OCI layout directories,
//! and hostile or damaged archives.
#![allow(clippy::unwrap_used)]
// Layers are unpacked onto a POSIX file system; Windows has no unpacker.
#![cfg(unix)]

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;

use common::{Layout, Packing, busybox_layer, skopeo_copy};
use supermachine_oci::{Error, LoadOptions, Store, load};

fn busybox_layout(dir: &Path) -> common::Built {
    let mut layout = Layout::new(dir);
    let built = layout.image("amd64", &[(Packing::Gzip, busybox_layer())], &["/bin/sh"]);
    layout.finish("v1");
    built
}

/// Unpacks a loaded image and checks busybox arrived intact.
fn assert_busybox_inside(store: &Store, record: &supermachine_oci::ImageRecord, work: &Path) {
    common::assert_busybox_in(common::unpack(store, record, work).path());
}

/// Nothing half-loaded: no records, no blobs, no temporaries.
fn assert_store_empty(store: &Store) {
    assert!(store.images().unwrap().is_empty());
    for dir in ["blobs/sha256", "tmp"] {
        let left: Vec<_> = fs::read_dir(store.root().join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{dir} holds {left:?}");
    }
}

fn gzip(path: &Path) -> std::path::PathBuf {
    let out = path.with_extension("tar.gz");
    let mut e =
        flate2::write::GzEncoder::new(fs::File::create(&out).unwrap(), flate2::Compression::fast());
    e.write_all(&fs::read(path).unwrap()).unwrap();
    e.finish().unwrap();
    out
}

#[test]
fn docker_save_and_oci_archives_from_skopeo_load_and_unpack() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let built = busybox_layout(&layout);
    let store = Store::open(&work.path().join("store")).unwrap();

    // docker save format (manifest.json, RepoTags, layer tars, symlinks).
    let docker = work.path().join("docker.tar");
    skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("docker-archive:{}:busy:latest", docker.display()),
    );
    let records = load(&store, &docker, &LoadOptions::default()).unwrap();
    assert_eq!(records.len(), 1);
    let saved = &records[0];
    assert_eq!(saved.reference, "docker.io/library/busy:latest");
    assert_eq!(saved.config_digest, built.config);
    assert_eq!(saved.platform, "linux/amd64");
    assert_busybox_inside(&store, saved, work.path());

    // The same archive gzip-compressed (as `docker save | gzip` gives) is
    // the same image.
    let again = load(&store, &gzip(&docker), &LoadOptions::default()).unwrap();
    assert_eq!(again[0].manifest_digest, saved.manifest_digest);

    // oci-archive, named with a full reference.
    let oci = work.path().join("oci.tar");
    skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("oci-archive:{}:localhost/busy:1", oci.display()),
    );
    let records = load(&store, &oci, &LoadOptions::default()).unwrap();
    assert_eq!(records[0].reference, "localhost/busy:1");
    assert_eq!(records[0].config_digest, built.config);
    assert_busybox_inside(&store, &records[0], work.path());

    // An unnamed oci-archive needs --tag, and then takes it.
    let unnamed = work.path().join("unnamed.tar");
    skopeo_copy(
        &format!("oci:{}:v1", layout.display()),
        &format!("oci-archive:{}", unnamed.display()),
    );
    match load(&store, &unnamed, &LoadOptions::default()) {
        Err(Error::Invalid(why)) => assert!(why.contains("--tag"), "{why}"),
        other => panic!("expected a request for --tag, got {other:?}"),
    }
    let tagged = LoadOptions {
        tag: Some("mine/busy:2".into()),
        ..LoadOptions::default()
    };
    let records = load(&store, &unnamed, &tagged).unwrap();
    assert_eq!(records[0].reference, "docker.io/mine/busy:2");

    let mut names: Vec<String> = store
        .images()
        .unwrap()
        .into_iter()
        .map(|r| r.reference)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "docker.io/library/busy:latest",
            "docker.io/mine/busy:2",
            "localhost/busy:1"
        ]
    );
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn an_oci_layout_directory_loads_the_hosts_platform_from_a_multi_arch_index() {
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let arm = layout.image("arm64", &[(Packing::Zstd, busybox_layer())], &["/bin/sh"]);
    let amd = layout.image("amd64", &[(Packing::Gzip, busybox_layer())], &["/bin/sh"]);
    layout.finish("v1");
    let store = Store::open(&work.path().join("store")).unwrap();

    // Named only by a bare tag: which repository is meant is unknown.
    match load(&store, &layout.dir, &LoadOptions::default()) {
        Err(Error::Invalid(why)) => {
            assert!(why.contains("\"v1\"") && why.contains("--tag"), "{why}")
        }
        other => panic!("expected a request for --tag, got {other:?}"),
    }
    assert_store_empty(&store);

    let options = LoadOptions {
        tag: Some("example.com/multi:v1".into()),
        ..LoadOptions::default()
    };
    let records = load(&store, &layout.dir, &options).unwrap();
    assert_eq!(records[0].manifest_digest, amd.manifest);
    assert_ne!(records[0].manifest_digest, arm.manifest);
    assert_busybox_inside(&store, &records[0], work.path());
    // The user's directory is read, never moved from.
    let hex = amd.layers[0].strip_prefix("sha256:").unwrap();
    assert!(layout.dir.join("blobs/sha256").join(hex).is_file());
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused_and_nothing_is_kept() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let built = busybox_layout(&layout);
    let hex = built.layers[0].strip_prefix("sha256:").unwrap();
    let blob = layout.join("blobs/sha256").join(hex);
    let mut bytes = fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let options = LoadOptions {
        tag: Some("bad:1".into()),
        ..LoadOptions::default()
    };

    for source in ["directory", "archive"] {
        let path = if source == "directory" {
            layout.clone()
        } else {
            // The same layout as an oci-archive tarball.
            let tar = work.path().join("bad.tar");
            let mut b = tar::Builder::new(fs::File::create(&tar).unwrap());
            b.append_dir_all(".", &layout).unwrap();
            b.finish().unwrap();
            tar
        };
        let store = Store::open(&work.path().join(format!("store-{source}"))).unwrap();
        match load(&store, &path, &options) {
            Err(Error::Invalid(why)) => {
                assert!(
                    why.contains(hex) && why.contains("refusing"),
                    "{source}: {why}"
                );
                assert!(!why.contains('\n'));
            }
            other => panic!("{source}: expected a refusal, got {other:?}"),
        }
        assert_store_empty(&store);
    }
}

/// A hand-made `docker save` archive: (name, bytes) files plus symlinks.
fn archive(path: &Path, files: &[(&str, &[u8])], links: &[(&str, &str)]) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        // Raw names: the tar crate's safe setters refuse `..`.
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, *bytes).unwrap();
    }
    for (name, target) in links {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, name, target).unwrap();
    }
    fs::write(path, b.into_inner().unwrap()).unwrap();
}

#[test]
fn hostile_and_damaged_archives_are_refused_with_one_line() {
    let work = tempfile::tempdir().unwrap();
    let store = Store::open(&work.path().join("store")).unwrap();
    let layer = busybox_layer();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        common::sha256(&layer)
    );
    let manifest = |config: &str, layer: &str| {
        format!(r#"[{{"Config":"{config}","RepoTags":["evil:1"],"Layers":["{layer}"]}}]"#)
    };
    let path = work.path().join("a.tar");
    let refused = |what: &str, expect: &str| {
        match load(&store, &path, &LoadOptions::default()) {
            Err(e) => {
                let why = e.to_string();
                assert!(why.contains(expect), "{what}: {why}");
                assert!(!why.contains('\n'), "{what}: one line: {why}");
            }
            Ok(r) => panic!("{what}: loaded {r:?}"),
        }
        assert_store_empty(&store);
    };

    // A sound archive first, so the failures below are about their flaw.
    let good = manifest("c.json", "l/layer.tar");
    archive(
        &path,
        &[
            ("manifest.json", good.as_bytes()),
            ("c.json", config.as_bytes()),
            ("l/layer.tar", &layer),
        ],
        &[],
    );
    let loaded = load(&store, &path, &LoadOptions::default()).unwrap();
    assert_eq!(loaded[0].reference, "docker.io/library/evil:1");
    store.remove_image("docker.io/library/evil:1").unwrap();
    assert_store_empty(&store);

    archive(
        &path,
        &[
            ("manifest.json", good.as_bytes()),
            ("c.json", config.as_bytes()),
            ("l/layer.tar", &layer),
            ("../escape", b"x"),
        ],
        &[],
    );
    refused("an entry climbing out", "points outside the archive");
    assert!(!work.path().join("escape").exists());

    let outside = manifest("../../../etc/passwd", "l/layer.tar");
    archive(
        &path,
        &[
            ("manifest.json", outside.as_bytes()),
            ("l/layer.tar", &layer),
        ],
        &[],
    );
    refused("a config path climbing out", "etc/passwd");

    archive(
        &path,
        &[
            ("manifest.json", good.as_bytes()),
            ("c.json", config.as_bytes()),
        ],
        &[("l/layer.tar", "../../../bin/busybox")],
    );
    refused("a layer symlinked outside", "links outside the archive");

    archive(
        &path,
        &[
            ("manifest.json", good.as_bytes()),
            ("c.json", config.as_bytes()),
        ],
        &[("l/layer.tar", "loop.tar"), ("l/loop.tar", "layer.tar")],
    );
    refused("a symlink loop", "too many levels");

    let mut changed = layer.clone();
    let at = changed.len() / 2;
    changed[at] ^= 0xff;
    archive(
        &path,
        &[
            ("manifest.json", good.as_bytes()),
            ("c.json", config.as_bytes()),
            ("l/layer.tar", &changed),
        ],
        &[],
    );
    refused("a layer that is not its diff_id", "refusing");

    fs::write(&path, b"this is not an archive at all, just some text").unwrap();
    refused("not an archive", "a.tar");

    let mut truncated = fs::read(gzip_of(&layer, work.path())).unwrap();
    truncated.truncate(truncated.len() / 2);
    fs::write(&path, &truncated).unwrap();
    refused("a truncated gzip stream", "a.tar");

    refused_missing(&store, &work.path().join("nope.tar"));
    assert_store_empty(&store);
}

fn gzip_of(bytes: &[u8], dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("raw.tar");
    fs::write(&raw, bytes).unwrap();
    gzip(&raw)
}

fn refused_missing(store: &Store, path: &Path) {
    match load(store, path, &LoadOptions::default()) {
        Err(e) => assert!(e.to_string().contains("nope.tar"), "{e}"),
        Ok(r) => panic!("loaded {r:?} from nothing"),
    }
}
