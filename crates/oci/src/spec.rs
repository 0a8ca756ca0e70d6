//! An image's config turned into the process to run, the way `docker run`
//! does it: Entrypoint and Cmd merged with the user's arguments, Env,
//! WorkingDir, User resolved through the image's own /etc/passwd and
//! /etc/group, ExposedPorts and StopSignal.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::Error;

/// `PATH` when the image sets none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The parts of an image config (`application/vnd.oci.image.config.v1+json`)
/// this crate reads.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ImageConfig {
    /// `amd64`, `arm64`, ...
    #[serde(default)]
    pub architecture: String,
    /// `linux`.
    #[serde(default)]
    pub os: String,
    /// The execution parameters.
    #[serde(default)]
    pub config: Option<ExecConfig>,
    /// The layers' uncompressed digests.
    #[serde(default)]
    pub rootfs: Option<RootFsConfig>,
}

/// `rootfs` of an image config.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RootFsConfig {
    /// One per layer, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// `config` of an image config.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExecConfig {
    /// `USER`.
    #[serde(default)]
    pub user: Option<String>,
    /// `ENV`, as `NAME=value`.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// `ENTRYPOINT`.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// `WORKDIR`.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `EXPOSE`: keys like `80/tcp`.
    #[serde(default)]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    /// `STOPSIGNAL`.
    #[serde(default)]
    pub stop_signal: Option<String>,
}

impl ImageConfig {
    /// Parses a config blob.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(bytes).map_err(|e| Error::Invalid(format!("image config: {e}")))
    }
}

/// What the user asked for on top of the image (`docker run` flags).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--entrypoint` (replaces the image's, and drops its Cmd).
    pub entrypoint: Option<Vec<String>>,
    /// Arguments after the image name (replace Cmd).
    pub args: Vec<String>,
    /// `-e NAME=value` (added to or replacing the image's).
    pub env: Vec<String>,
    /// `-w DIR`.
    pub working_dir: Option<String>,
    /// `-u USER[:GROUP]`.
    pub user: Option<String>,
}

/// A port the image exposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Port {
    /// The port number.
    pub number: u16,
    /// `tcp` (false) or `udp` (true).
    pub udp: bool,
}

/// The process to start in the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// argv; `args[0]` is the program.
    pub args: Vec<String>,
    /// The environment, in order, each name once.
    pub env: Vec<(String, String)>,
    /// The working directory (absolute).
    pub cwd: String,
    /// User and group IDs.
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Supplementary groups (from /etc/group membership).
    pub groups: Vec<u32>,
    /// Exposed ports.
    pub ports: Vec<Port>,
    /// The signal that asks the process to stop (`SIGTERM` unless set).
    pub stop_signal: String,
}

impl ProcessSpec {
    /// Merges an image config with the user's overrides; `passwd` and
    /// `group` are the image's own account files (may be empty).
    pub fn new(
        config: &ImageConfig,
        user: &Overrides,
        passwd: &str,
        group: &str,
    ) -> Result<Self, Error> {
        let exec = config.config.clone().unwrap_or_default();
        let (entrypoint, cmd) = match &user.entrypoint {
            Some(ep) => (ep.clone(), user.args.clone()),
            None if !user.args.is_empty() => {
                (exec.entrypoint.unwrap_or_default(), user.args.clone())
            }
            None => (
                exec.entrypoint.unwrap_or_default(),
                exec.cmd.unwrap_or_default(),
            ),
        };
        let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        if args.is_empty() {
            return Err(Error::Invalid(
                "the image has no Entrypoint or Cmd and no command was given".into(),
            ));
        }

        let mut env: Vec<(String, String)> = Vec::new();
        for item in exec.env.unwrap_or_default().iter().chain(&user.env) {
            let (name, value) = item.split_once('=').unwrap_or((item, ""));
            if name.is_empty() {
                return Err(Error::Invalid(format!(
                    "environment entry {item:?} has no name"
                )));
            }
            match env.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 = value.to_string(),
                None => env.push((name.to_string(), value.to_string())),
            }
        }
        if !env.iter().any(|(n, _)| n == "PATH") {
            env.insert(0, ("PATH".into(), DEFAULT_PATH.into()));
        }

        let user_spec = user
            .user
            .clone()
            .or(exec.user)
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "0".into());
        let account = resolve_user(&user_spec, passwd, group)?;
        if !env.iter().any(|(n, _)| n == "HOME") {
            env.push(("HOME".into(), account.home.clone()));
        }

        let cwd = user
            .working_dir
            .clone()
            .or(exec.working_dir)
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "/".into());
        if !cwd.starts_with('/') {
            return Err(Error::Invalid(format!(
                "working directory {cwd:?} is not absolute"
            )));
        }

        let mut ports = Vec::new();
        for key in exec.exposed_ports.unwrap_or_default().keys() {
            let (number, proto) = key.split_once('/').unwrap_or((key, "tcp"));
            let number = number.parse().map_err(|_| {
                Error::Invalid(format!("exposed port {key:?} is not a port number"))
            })?;
            let udp = match proto {
                "tcp" => false,
                "udp" => true,
                _ => {
                    return Err(Error::Invalid(format!(
                        "exposed port {key:?}: unknown protocol"
                    )));
                }
            };
            ports.push(Port { number, udp });
        }

        Ok(Self {
            args,
            env,
            cwd,
            uid: account.uid,
            gid: account.gid,
            groups: account.groups,
            ports,
            stop_signal: exec
                .stop_signal
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "SIGTERM".into()),
        })
    }
}

struct Account {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    home: String,
}

/// Resolves `user[:group]` the way runc does: names through the image's
/// files; a numeric user need not exist (then its group is 0 and its home
/// is `/`).
fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<Account, Error> {
    let (user, group_spec) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd_entries: Vec<Vec<&str>> = passwd
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect())
        .filter(|f: &Vec<&str>| f.len() >= 7)
        .collect();
    let group_entries: Vec<Vec<&str>> = group
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect())
        .filter(|f: &Vec<&str>| f.len() >= 4)
        .collect();
    let (uid, entry) = match user.parse::<u32>() {
        Ok(uid) => (uid, passwd_entries.iter().find(|f| f[2].parse() == Ok(uid))),
        Err(_) => {
            let f = passwd_entries
                .iter()
                .find(|f| f[0] == user)
                .ok_or_else(|| {
                    Error::Invalid(format!("user {user:?} is not in the image's /etc/passwd"))
                })?;
            let uid = f[2].parse().map_err(|_| {
                Error::Invalid(format!("/etc/passwd entry for {user:?} has a bad uid"))
            })?;
            (uid, Some(f))
        }
    };
    let name = entry.map(|f| f[0]);
    let home = entry.map_or("/", |f| f[5]).to_string();
    let mut gid = entry.and_then(|f| f[3].parse().ok()).unwrap_or(0);
    if let Some(g) = group_spec {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| {
                    Error::Invalid(format!("group {g:?} is not in the image's /etc/group"))
                })?,
        };
    }
    let mut groups = Vec::new();
    if group_spec.is_none()
        && let Some(name) = name
    {
        for f in &group_entries {
            if f[3].split(',').any(|m| m == name)
                && let Ok(g) = f[2].parse::<u32>()
                && g != gid
                && !groups.contains(&g)
            {
                groups.push(g);
            }
        }
    }
    Ok(Account {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33:www:/var/www:/bin/false\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwww:x:33:\napp:x:1000:\nvideo:x:44:app\naudio:x:29:app,www\n";

    fn config(json: &str) -> ImageConfig {
        ImageConfig::parse(json.as_bytes()).unwrap_or_default()
    }

    fn spec(json: &str, user: Overrides) -> Result<ProcessSpec, Error> {
        ProcessSpec::new(&config(json), &user, PASSWD, GROUP)
    }

    #[test]
    fn entrypoint_and_cmd_merge_like_docker_run() {
        let json =
            r#"{"config":{"Entrypoint":["/bin/tini","--"],"Cmd":["nginx","-g","daemon off;"]}}"#;
        let args = |o: Overrides| spec(json, o).map(|s| s.args).unwrap_or_default();
        assert_eq!(
            args(Overrides::default()),
            ["/bin/tini", "--", "nginx", "-g", "daemon off;"]
        );
        let user_args = Overrides {
            args: vec!["sh".into()],
            ..Overrides::default()
        };
        assert_eq!(args(user_args), ["/bin/tini", "--", "sh"]);
        let new_entrypoint = Overrides {
            entrypoint: Some(vec!["/bin/sh".into()]),
            ..Overrides::default()
        };
        assert_eq!(
            args(new_entrypoint),
            ["/bin/sh"],
            "Cmd is dropped with a new entrypoint"
        );
        assert!(spec("{}", Overrides::default()).is_err(), "nothing to run");
    }

    #[test]
    fn env_workdir_ports_and_stop_signal() {
        let json = r#"{"config":{"Cmd":["x"],"Env":["A=1","PATH=/bin","B=x=y"],"WorkingDir":"/srv",
            "ExposedPorts":{"80/tcp":{},"53/udp":{}},"StopSignal":"SIGQUIT"}}"#;
        let s = spec(
            json,
            Overrides {
                env: vec!["A=2".into(), "C".into()],
                ..Overrides::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let env: Vec<(&str, &str)> = s
            .env
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("A", "2"),
                ("PATH", "/bin"),
                ("B", "x=y"),
                ("C", ""),
                ("HOME", "/root")
            ]
        );
        assert_eq!(s.cwd, "/srv");
        assert_eq!(s.stop_signal, "SIGQUIT");
        assert!(s.ports.contains(&Port {
            number: 80,
            udp: false
        }));
        assert!(s.ports.contains(&Port {
            number: 53,
            udp: true
        }));
        let bare = spec(r#"{"config":{"Cmd":["x"]}}"#, Overrides::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bare.env[0], ("PATH".into(), DEFAULT_PATH.into()));
        assert_eq!(
            (bare.cwd.as_str(), bare.stop_signal.as_str(), bare.uid),
            ("/", "SIGTERM", 0)
        );
    }

    #[test]
    fn users_resolve_through_the_images_own_files() {
        let with_user = |u: &str| {
            spec(
                r#"{"config":{"Cmd":["x"]}}"#,
                Overrides {
                    user: Some(u.into()),
                    ..Overrides::default()
                },
            )
        };
        let app = with_user("app").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (app.uid, app.gid, app.groups.as_slice()),
            (1000, 1000, &[44, 29][..])
        );
        assert!(app.env.contains(&("HOME".into(), "/home/app".into())));
        let www = with_user("www:video").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((www.uid, www.gid), (33, 44));
        let numeric = with_user("4242").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((numeric.uid, numeric.gid), (4242, 0));
        let pair = with_user("4242:4343").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((pair.uid, pair.gid), (4242, 4343));
        for bad in ["nobody", "app:nogroup"] {
            match with_user(bad) {
                Err(Error::Invalid(why)) => assert!(why.contains("is not in the image's"), "{why}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let image_user = spec(
            r#"{"config":{"Cmd":["x"],"User":"www"}}"#,
            Overrides::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(image_user.uid, 33);
    }
}
