//! Whom a process runs as: `docker run -u` syntax resolved through the
//! guest's own /etc/passwd and /etc/group, the way container runtimes do.

use std::path::Path;

use supermachine_agent_protocol::User;

/// Longest account file read.
const MAX_ACCOUNT_FILE: u64 = 4 << 20;

/// A resolved identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (the primary one included).
    pub groups: Vec<u32>,
    /// Home directory (`/` when the user has no passwd entry).
    pub home: String,
}

/// Why a user could not be resolved.
#[derive(Debug, PartialEq, Eq)]
pub struct NotFound(pub String);

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn read_account_file(root: &Path, name: &str) -> String {
    use std::io::Read;
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open(root.join("etc").join(name)) {
        let _ = f.take(MAX_ACCOUNT_FILE).read_to_string(&mut text);
    }
    text
}

fn passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || f[0].starts_with('#') {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

fn groups(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || f[0].starts_with('#') {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// Resolves `user` against the account files under `root` (the guest's
/// `/`). `None` means root.
pub fn resolve(root: &Path, user: Option<&User>) -> Result<Identity, NotFound> {
    let spec = match user {
        None => "0",
        Some(User::Ids { uid, gid, groups }) => {
            let pw = passwd(&read_account_file(root, "passwd"));
            let home = pw
                .iter()
                .find(|p| p.uid == *uid)
                .map_or_else(|| "/".to_string(), |p| p.home.clone());
            let mut all = vec![*gid];
            all.extend(groups.iter().filter(|g| **g != *gid));
            return Ok(Identity {
                uid: *uid,
                gid: *gid,
                groups: all,
                home,
            });
        }
        Some(User::Spec(s)) if s.is_empty() => "0",
        Some(User::Spec(s)) => s.as_str(),
    };
    resolve_spec(
        spec,
        &read_account_file(root, "passwd"),
        &read_account_file(root, "group"),
    )
}

/// `user[:group]` against passwd and group file contents.
pub fn resolve_spec(spec: &str, passwd_text: &str, group_text: &str) -> Result<Identity, NotFound> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let pw = passwd(passwd_text);
    let gr = groups(group_text);
    let entry = pw.iter().find(|p| p.name == user_part).or_else(|| {
        user_part
            .parse::<u32>()
            .ok()
            .and_then(|uid| pw.iter().find(|p| p.uid == uid))
    });
    let (uid, mut gid, name, home) = match (entry, user_part.parse::<u32>()) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name.as_str()), e.home.clone()),
        // A numeric user without an entry runs as that uid, group 0.
        (None, Ok(uid)) => (uid, 0, None, "/".to_string()),
        (None, Err(_)) => {
            return Err(NotFound(format!(
                "unable to find user {user_part}: no matching entries in passwd file"
            )));
        }
    };
    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = match (gr.iter().find(|e| e.name == g), g.parse::<u32>()) {
            (Some(e), _) => e.gid,
            (None, Ok(n)) => n,
            (None, Err(_)) => {
                return Err(NotFound(format!(
                    "unable to find group {g}: no matching entries in group file"
                )));
            }
        };
    }
    let mut all = vec![gid];
    if let Some(name) = name {
        for g in &gr {
            if g.members.iter().any(|m| m == name) && !all.contains(&g.gid) {
                all.push(g.gid);
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups: all,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        broken line\n\
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:app,other\napp:x:1000:\nstaff:x:50:app\n";

    #[test]
    fn names_ids_and_groups_resolve_as_docker_does() {
        let app = resolve_spec("app", PASSWD, GROUP).unwrap();
        assert_eq!(
            (app.uid, app.gid, app.home.as_str()),
            (1000, 1000, "/home/app")
        );
        assert_eq!(app.groups, vec![1000, 10, 50]);
        assert_eq!(resolve_spec("1000", PASSWD, GROUP).unwrap(), app);
        let with_group = resolve_spec("app:staff", PASSWD, GROUP).unwrap();
        assert_eq!((with_group.uid, with_group.gid), (1000, 50));
        assert_eq!(resolve_spec("app:77", PASSWD, GROUP).unwrap().gid, 77);
        let unknown = resolve_spec("4242:4343", PASSWD, GROUP).unwrap();
        assert_eq!(
            (unknown.uid, unknown.gid, unknown.home.as_str()),
            (4242, 4343, "/")
        );
        assert_eq!(resolve_spec("4242", PASSWD, GROUP).unwrap().gid, 0);
        assert_eq!(resolve_spec("0", PASSWD, GROUP).unwrap().home, "/root");
    }

    #[test]
    fn unknown_names_are_errors() {
        assert_eq!(
            resolve_spec("ghost", PASSWD, GROUP).unwrap_err().0,
            "unable to find user ghost: no matching entries in passwd file"
        );
        assert_eq!(
            resolve_spec("app:ghosts", PASSWD, GROUP).unwrap_err().0,
            "unable to find group ghosts: no matching entries in group file"
        );
    }
}
