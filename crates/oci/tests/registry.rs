//! Pulling from a real registry (Debian's docker-registry on 127.0.0.1)
//! images pushed by skopeo.
#![allow(clippy::unwrap_used)]
// Layers are unpacked onto a POSIX file system; Windows has no unpacker.
#![cfg(unix)]

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use common::{Item, Layout, Packing, Registry, busybox_layer, layer_tar};
use supermachine_oci::{Error, Limits, PullOptions, Store, pull, rootfs};

fn options() -> PullOptions {
    PullOptions::default()
}

fn modified(path: &Path) -> SystemTime {
    fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn a_multi_arch_index_resolves_to_the_host_and_a_second_pull_downloads_nothing() {
    let registry = Registry::start(None);
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let base = busybox_layer();
    let arm = layout.image("arm64", &[(Packing::Gzip, base.clone())], &["/bin/sh"]);
    let amd = layout.image(
        "amd64",
        &[(Packing::Gzip, base)],
        &["/bin/sh", "-c", "echo hi"],
    );
    layout.finish("v1");
    registry.push(&layout.dir, "v1", "test/multi", None);

    let store = Store::open(&work.path().join("store")).unwrap();
    let reference = format!("{}/test/multi:v1", registry.addr);
    let record = pull(&store, &reference, &options()).unwrap();
    assert_eq!(record.reference, reference);
    assert_eq!(record.platform, "linux/amd64");
    assert_eq!(record.manifest_digest, amd.manifest);
    assert_eq!(record.config_digest, amd.config);
    assert_ne!(record.config_digest, arm.config);
    assert_eq!(store.images().unwrap(), vec![record.clone()]);

    let blob = store.blob_path(&supermachine_oci::Digest::parse(&amd.layers[0]).unwrap());
    let before = modified(&blob);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let again = pull(&store, &reference, &options()).unwrap();
    assert_eq!(again.manifest_digest, record.manifest_digest);
    assert_eq!(
        modified(&blob),
        before,
        "a cached layer is not fetched again"
    );
    assert_eq!(
        fs::read_dir(store.root().join("tmp")).unwrap().count(),
        0,
        "no temporaries left"
    );

    // The disk: built once, then reused as is.
    let disk = rootfs::build(&store, &record, Limits::default()).unwrap();
    assert!(!disk.cached);
    assert!(disk.passwd.contains("web:x:80:80"));
    let fsck = std::process::Command::new("fsck.erofs")
        .arg(&disk.disk)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    let built = modified(&disk.disk);
    let cached = rootfs::build(&store, &record, Limits::default()).unwrap();
    assert!(cached.cached);
    assert_eq!(modified(&cached.disk), built);

    // rmi removes the record, its blobs and its disk.
    store.remove_image(&reference).unwrap();
    assert!(store.images().unwrap().is_empty());
    assert!(!blob.exists() && !disk.disk.exists());
    assert!(matches!(
        store.remove_image(&reference),
        Err(Error::NoSuchImage(_))
    ));
}

#[test]
fn gzip_and_zstd_layers_with_whiteouts_and_an_opaque_directory_unpack_in_order() {
    let registry = Registry::start(None);
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let middle = layer_tar(&[
        Item::Dir("srv"),
        Item::File("srv/keep", b"keep".to_vec(), 0o644),
        Item::File("srv/drop", b"drop".to_vec(), 0o644),
        Item::Dir("srv/cache"),
        Item::File("srv/cache/old", b"old".to_vec(), 0o644),
    ]);
    let top = layer_tar(&[
        Item::File("srv/.wh.drop", Vec::new(), 0o644),
        Item::Dir("srv/cache"),
        Item::File("srv/cache/.wh..wh..opq", Vec::new(), 0o644),
        Item::File("srv/cache/new", b"new".to_vec(), 0o644),
    ]);
    layout.image(
        "amd64",
        &[
            (Packing::Gzip, busybox_layer()),
            (Packing::Zstd, middle),
            (Packing::Gzip, top),
        ],
        &["/bin/sh"],
    );
    layout.finish("layers");
    registry.push(&layout.dir, "layers", "test/layers", None);

    let store = Store::open(&work.path().join("store")).unwrap();
    let record = pull(
        &store,
        &format!("{}/test/layers:layers", registry.addr),
        &options(),
    )
    .unwrap();
    assert_eq!(record.layers.len(), 3);
    assert!(record.layers[1].media_type.ends_with("+zstd"));
    let tree = common::unpack(&store, &record, work.path());
    let tree = tree.path();
    assert_eq!(fs::read(tree.join("srv/keep")).unwrap(), b"keep");
    assert!(!tree.join("srv/drop").exists());
    assert!(!tree.join("srv/cache/old").exists());
    assert_eq!(fs::read(tree.join("srv/cache/new")).unwrap(), b"new");
    common::assert_busybox_in(tree);
}

#[test]
fn basic_auth_works_with_the_docker_config_and_a_wrong_password_is_a_clear_error() {
    let registry = Registry::start(Some(("tester", "s3cret")));
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    layout.image("amd64", &[(Packing::Gzip, busybox_layer())], &["/bin/sh"]);
    layout.finish("v1");
    registry.push(&layout.dir, "v1", "private/img", Some("tester:s3cret"));
    let store = Store::open(&work.path().join("store")).unwrap();
    let reference = format!("{}/private/img:v1", registry.addr);

    let wrong = PullOptions {
        credentials: Some(("tester".into(), "wrong".into())),
        ..options()
    };
    let why = common::registry_refusal(pull(&store, &reference, &wrong));
    assert!(why.contains(&registry.addr), "{why}");
    assert!(
        why.contains("unauthorized") || why.contains("authentication"),
        "{why}"
    );
    assert!(store.images().unwrap().is_empty());

    // The Docker config, as `docker login` writes it.
    let docker = work.path().join("docker");
    fs::create_dir(&docker).unwrap();
    let mut f = fs::File::create(docker.join("config.json")).unwrap();
    write!(
        f,
        r#"{{"auths":{{"{}":{{"auth":"dGVzdGVyOnMzY3JldA=="}}}}}}"#,
        registry.addr
    )
    .unwrap();
    let from_config = PullOptions {
        docker_config: Some(docker.join("config.json")),
        ..options()
    };
    pull(&store, &reference, &from_config).unwrap();
    assert_eq!(store.images().unwrap().len(), 1);
}

#[test]
fn a_blob_corrupted_in_the_registry_is_refused_and_nothing_is_stored() {
    let registry = Registry::start(None);
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let built = layout.image("amd64", &[(Packing::Gzip, busybox_layer())], &["/bin/sh"]);
    layout.finish("v1");
    registry.push(&layout.dir, "v1", "test/corrupt", None);
    // Same length, different bytes: only the digest can tell.
    let file = registry.blob_file(&built.layers[0]);
    let mut bytes = fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&file, &bytes).unwrap();

    let store = Store::open(&work.path().join("store")).unwrap();
    match pull(
        &store,
        &format!("{}/test/corrupt:v1", registry.addr),
        &options(),
    ) {
        Err(Error::DigestMismatch { expected, .. }) => assert_eq!(expected, built.layers[0]),
        // oci-client checks the digest as the stream ends, before the store.
        Err(Error::Registry(why)) => {
            assert!(
                why.contains("Invalid digest") && why.contains(&built.layers[0]),
                "{why}"
            )
        }
        other => panic!("expected a digest refusal, got {other:?}"),
    }
    assert!(store.images().unwrap().is_empty());
    let layer = supermachine_oci::Digest::parse(&built.layers[0]).unwrap();
    assert!(
        !store.blob_path(&layer).exists(),
        "the bad blob is not stored"
    );
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn a_pull_interrupted_mid_layer_keeps_no_partial_blob_and_a_retry_completes() {
    use std::io::Read;
    let mut registry = Registry::start(None);
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    // Incompressible, so the layer is as big on the wire as on disk.
    let mut noise = vec![0u8; 6 << 20];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut noise)
        .unwrap();
    let big = layer_tar(&[
        Item::Dir("data"),
        Item::File("data/noise", noise.clone(), 0o644),
    ]);
    let built = layout.image(
        "amd64",
        &[(Packing::Gzip, busybox_layer()), (Packing::Gzip, big)],
        &["/bin/sh"],
    );
    layout.finish("v1");
    registry.push(&layout.dir, "v1", "test/big", None);

    // Let 2 MiB through, then hold the connection while the registry is
    // stopped: the layer download is in flight when it dies.
    let relay = common::Relay::start(&registry.addr, 2 << 20);
    let store = Store::open(&work.path().join("store")).unwrap();
    let reference = format!("{}/test/big:v1", relay.addr);
    let pulling = {
        let (store, reference) = (store.clone(), reference.clone());
        std::thread::spawn(move || pull(&store, &reference, &options()))
    };
    relay.wait_until_cut();
    let noise_layer = supermachine_oci::Digest::parse(&built.layers[1]).unwrap();
    assert!(
        !store.blob_path(&noise_layer).exists(),
        "a blob being downloaded is not in the store"
    );
    registry.stop();
    relay.cut_and_open();
    let why = common::registry_refusal(pulling.join().unwrap());
    assert!(why.contains(&relay.addr), "{why}");
    assert!(
        store.images().unwrap().is_empty(),
        "no record for a failed pull"
    );
    assert!(!store.blob_path(&noise_layer).exists());
    assert_eq!(
        fs::read_dir(store.root().join("tmp")).unwrap().count(),
        0,
        "the partial download is gone"
    );
    // Every blob that did arrive is whole: its name is its digest.
    for entry in fs::read_dir(store.root().join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        assert_eq!(
            common::file_digest(&entry.path()),
            entry.file_name().to_string_lossy()
        );
    }

    // A process killed mid-pull leaves its temporary behind; the next
    // store open removes it.
    fs::write(store.root().join("tmp/4000000000-partial"), b"half a blob").unwrap();
    let store = Store::open(store.root()).unwrap();
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);

    registry.restart();
    let record = pull(&store, &reference, &options()).unwrap();
    assert_eq!(record.manifest_digest, built.manifest);
    let tree = common::unpack(&store, &record, work.path());
    assert!(fs::read(tree.path().join("data/noise")).unwrap() == noise);
}

#[test]
fn docker_schema_2_manifests_and_layers_pull_too() {
    let registry = Registry::start(None);
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let built = layout.image("amd64", &[(Packing::Gzip, busybox_layer())], &["/bin/sh"]);
    layout.finish("v1");
    // skopeo rewrites the manifest and config as Docker's media types.
    registry.push_as(&layout.dir, "v1", "test/docker", None, Some("v2s2"));

    let store = Store::open(&work.path().join("store")).unwrap();
    let record = pull(
        &store,
        &format!("{}/test/docker:v1", registry.addr),
        &options(),
    )
    .unwrap();
    assert_ne!(
        record.manifest_digest, built.manifest,
        "a converted manifest"
    );
    let manifest = store
        .read_small_blob(&supermachine_oci::Digest::parse(&record.manifest_digest).unwrap())
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        record.layers[0].media_type,
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    common::assert_busybox_in(common::unpack(&store, &record, work.path()).path());
}

#[test]
fn https_registries_are_verified_against_the_ca_kept_for_them() {
    let registry = Registry::start_tls();
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    layout.image("amd64", &[(Packing::Gzip, busybox_layer())], &["/bin/sh"]);
    layout.finish("v1");
    registry.push(&layout.dir, "v1", "test/tls", None);
    let store = Store::open(&work.path().join("store")).unwrap();
    let reference = format!("{}/test/tls:v1", registry.addr);

    // Docker's layout: <certs.d>/<host:port>/ca.crt.
    let certs_with = |ca: &Path, name: &str| {
        let dir = work.path().join(name);
        fs::create_dir_all(dir.join(&registry.addr)).unwrap();
        fs::copy(ca, dir.join(&registry.addr).join("ca.crt")).unwrap();
        dir
    };
    let trusted = PullOptions {
        certs_dir: Some(certs_with(&registry.ca(), "trusted")),
        ..options()
    };
    let record = pull(&store, &reference, &trusted).unwrap();
    common::assert_busybox_in(common::unpack(&store, &record, work.path()).path());
    store.remove_image(&reference).unwrap();

    // A certificate from another CA is refused: verification is on.
    let other = work.path().join("other-ca");
    fs::create_dir(&other).unwrap();
    common::make_certificates(&other);
    let untrusted = PullOptions {
        certs_dir: Some(certs_with(&other.join("ca.crt"), "untrusted")),
        ..options()
    };
    let why = common::registry_refusal(pull(&store, &reference, &untrusted));
    assert!(why.to_lowercase().contains("certificate"), "{why}");
    assert!(store.images().unwrap().is_empty());
}
