//! What Docker makes of an image config's `User` and `Env` for a container's process: the uid,
//! gid and supplementary groups read from the image's own `/etc/passwd` and `/etc/group`, `HOME`
//! from the user's passwd entry (`/` when it has none, runc's rule, which Docker relies on), and
//! the environment with the step's variables over the image's.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

use super::ID_COUNT;

/// The longest `/etc/passwd` or `/etc/group` read from an image.
const MAX_DB_BYTES: u64 = 4 << 20;
/// The supplementary groups kept (Linux allows 65536; Docker images list a handful).
const MAX_GROUPS: usize = 64;

/// The process identity of a step in an image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the groups of `/etc/group` that list the user by name.
    pub groups: Vec<u32>,
    /// The user's home directory (`/` when the image has no passwd entry for it).
    pub home: String,
}

/// Reads `etc/<name>` of the image tree `root` without following a symlink anywhere (an image may
/// point it at a host file); missing or unreadable is empty, as runc treats it.
fn read_db(root: &Path, name: &str) -> String {
    let Ok(tree) = crate::base::fs::Beneath::open(root) else { return String::new() };
    let Ok(f) = tree.open_file(&Path::new("etc").join(name)) else { return String::new() };
    let mut buf = Vec::new();
    let _ = f.take(MAX_DB_BYTES).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Resolves the config's `User` (`""`, `name`, `uid`, `name:group`, `uid:gid`) against the image
/// tree `root`, as Docker does: a name must exist in the image, a number need not (then its gid
/// is 0 and its home `/`).
pub(crate) fn resolve(root: &Path, user: &str) -> Result<RunAs> {
    resolve_in(&read_db(root, "passwd"), &read_db(root, "group"), user)
}

fn resolve_in(passwd: &str, group: &str, user: &str) -> Result<RunAs> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    // name:password:uid:gid:gecos:home:shell
    let entries: Vec<Vec<&str>> =
        passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).filter(|f| f.len() >= 7).collect();
    let numeric = u.parse::<u32>().ok();
    let found = entries.iter().find(|f| match numeric {
        Some(n) => f[2].parse::<u32>().ok() == Some(n),
        None => f[0] == u,
    });
    let (uid, mut gid, home, name) = match (found, numeric) {
        (Some(f), _) => (
            f[2].parse::<u32>()
                .with_context(|| format!("the image's passwd entry of {u:?} has a bad uid"))?,
            f[3].parse::<u32>().unwrap_or(0),
            if f[5].is_empty() { "/".to_string() } else { f[5].to_string() },
            Some(f[0]),
        ),
        (None, Some(n)) => (n, 0, "/".to_string(), None),
        (None, None) => {
            bail!("unable to find user {u}: no matching entries in the image's /etc/passwd (the image config's User is {user:?})")
        }
    };
    // name:password:gid:member,member
    let groups: Vec<Vec<&str>> =
        group.lines().map(|l| l.split(':').collect::<Vec<_>>()).filter(|f| f.len() >= 4).collect();
    if let Some(g) = g.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => match groups.iter().find(|f| f[0] == g) {
                Some(f) => f[2].parse::<u32>().with_context(|| format!("the image's group {g:?} has a bad gid"))?,
                None => bail!("unable to find group {g}: no matching entries in the image's /etc/group (the image config's User is {user:?})"),
            },
        };
    }
    let mut extra = Vec::new();
    if let (Some(name), None) = (name, g) {
        for f in &groups {
            if f[3].split(',').any(|m| m == name) {
                if let Ok(n) = f[2].parse::<u32>() {
                    if n != gid && !extra.contains(&n) && extra.len() < MAX_GROUPS {
                        extra.push(n);
                    }
                }
            }
        }
    }
    for id in std::iter::once(uid).chain(std::iter::once(gid)).chain(extra.iter().copied()) {
        if id >= ID_COUNT {
            bail!("the image's user {user:?} has id {id}, outside the {ID_COUNT} ids a container maps");
        }
    }
    Ok(RunAs { uid, gid, groups: extra, home })
}

/// A step's environment as Docker builds it: the image's `Env`, then the step's variables (which
/// replace the image's of the same name), `PATH` when neither sets it, and `HOME` (the user's)
/// when neither sets it.
pub(crate) fn environment(
    image_env: &[String],
    step_env: &[String],
    default_path: &str,
    home: &str,
) -> Vec<String> {
    let name = |e: &String| e.split_once('=').map(|(n, _)| n.to_string());
    let mut out: Vec<String> = Vec::with_capacity(image_env.len() + step_env.len() + 2);
    for e in image_env.iter().chain(step_env).filter(|e| e.contains('=')) {
        let n = name(e);
        match out.iter().position(|o| name(o) == n) {
            Some(i) => out[i] = e.clone(),
            None => out.push(e.clone()),
        }
    }
    let has = |out: &[String], k: &str| out.iter().any(|e| e.split_once('=').map(|(n, _)| n) == Some(k));
    if !has(&out, "PATH") {
        out.insert(0, format!("PATH={default_path}"));
    }
    if !has(&out, "HOME") {
        out.insert(1, format!("HOME={home}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/sh\nnode:x:1000:1000::/home/node:/bin/sh\nnohome:x:7:8:::/bin/sh\n";
    const GROUP: &str = "root:x:0:\nnode:x:1000:\nstaff:x:50:node,other\ndocker:x:999:node\n";

    #[test]
    fn users_resolve_as_docker_does() {
        let r = |u: &str| resolve_in(PASSWD, GROUP, u);
        assert_eq!(r("").unwrap(), RunAs { uid: 0, gid: 0, groups: vec![], home: "/root".into() });
        assert_eq!(
            r("node").unwrap(),
            RunAs { uid: 1000, gid: 1000, groups: vec![50, 999], home: "/home/node".into() }
        );
        assert_eq!(r("1000").unwrap().home, "/home/node");
        assert_eq!(r("nohome").unwrap(), RunAs { uid: 7, gid: 8, groups: vec![], home: "/".into() });
        assert_eq!(r("4242").unwrap(), RunAs { uid: 4242, gid: 0, groups: vec![], home: "/".into() });
        assert_eq!(
            r("node:staff").unwrap(),
            RunAs { uid: 1000, gid: 50, groups: vec![], home: "/home/node".into() }
        );
        assert_eq!(r("4242:77").unwrap(), RunAs { uid: 4242, gid: 77, groups: vec![], home: "/".into() });
        let e = r("ghost").unwrap_err().to_string();
        assert!(e.contains("unable to find user ghost"), "{e}");
        assert!(r("node:ghosts").unwrap_err().to_string().contains("unable to find group ghosts"));
        assert!(r("70000").unwrap_err().to_string().contains("outside the 65536 ids"));
        assert_eq!(resolve_in("", "", "").unwrap().home, "/", "no passwd: root with HOME=/");
    }

    #[test]
    fn step_variables_win_over_the_images() {
        let img = vec!["PATH=/opt/bin:/bin".to_string(), "LANG=C".into(), "A=image".into()];
        let step = vec!["A=step".to_string(), "B=2".into()];
        assert_eq!(
            environment(&img, &step, "/usr/bin", "/root"),
            vec!["PATH=/opt/bin:/bin", "HOME=/root", "LANG=C", "A=step", "B=2"]
        );
        assert_eq!(
            environment(&[], &["HOME=/h".into()], "/usr/bin", "/root"),
            vec!["PATH=/usr/bin", "HOME=/h"]
        );
    }
}
