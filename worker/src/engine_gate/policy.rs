//! What the engine gate lets through: the calls the docker sandbox backend makes, on the
//! containers it labels, with container bodies that keep a session confined. Everything else
//! is refused with a message saying which rule refused it.

use std::path::{Component, Path, PathBuf};

use http::Method;
use serde_json::{Map, Value};

use crate::sandbox::WORKER_LABEL;

/// Why a request was refused (answered 403 in the engine's error format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

impl Denied {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Which engine call a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/_ping`, `/version`: the client's version negotiation.
    Probe,
    /// `GET /images/{name}/json`.
    ImageInspect,
    /// `GET /containers/json`, only filtered by the worker label.
    ContainerList,
    /// `GET /events`, only filtered by the worker label (the backend follows `oom` events).
    Events,
    /// `POST /containers/create`.
    ContainerCreate,
    /// An operation on one existing container, which must carry the worker label.
    Container {
        /// The container id or name as the client gave it.
        id: &'a str,
        /// Whether it creates an exec (its body is checked).
        exec: bool,
    },
    /// `POST /exec/{id}/start`, `GET /exec/{id}/json`: an exec of a labelled container.
    Exec {
        /// The exec id.
        id: &'a str,
    },
}

/// Classifies a request; anything the backend does not do is refused.
pub fn route<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, Denied> {
    let path = strip_version(path);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let get = *method == Method::GET || *method == Method::HEAD;
    let post = *method == Method::POST;
    let route = match segments.as_slice() {
        ["_ping"] if get => Route::Probe,
        ["version"] if get => Route::Probe,
        ["images", .., "json"] if get && segments.len() >= 3 => Route::ImageInspect,
        ["containers", "json"] if get => Route::ContainerList,
        ["events"] if get => Route::Events,
        ["containers", "create"] if post => Route::ContainerCreate,
        ["containers", id] if *method == Method::DELETE => Route::Container { id, exec: false },
        ["containers", id, "json"] if get => Route::Container { id, exec: false },
        ["containers", id, "start" | "kill" | "wait"] if post => {
            Route::Container { id, exec: false }
        }
        ["containers", id, "exec"] if post => Route::Container { id, exec: true },
        ["exec", id, "start"] if post => Route::Exec { id },
        ["exec", id, "json"] if get => Route::Exec { id },
        _ => {
            return Err(Denied(format!(
                "the engine gate does not allow {method} {path}: only the calls of heist's \
                 docker sandbox backend pass"
            )));
        }
    };
    Ok(route)
}

/// `/v1.41/containers/json` → `/containers/json`.
fn strip_version(path: &str) -> &str {
    let Some(rest) = path.strip_prefix("/v") else {
        return path;
    };
    let end = rest.find('/').unwrap_or(rest.len());
    let version = &rest[..end];
    if !version.is_empty() && version.chars().all(|c| c.is_ascii_digit() || c == '.') {
        &rest[end..]
    } else {
        path
    }
}

/// Whether a container list or event query is filtered by the worker label (the backend's
/// sweep and its `oom` events), so the gate never shows the host's other containers.
pub fn check_list(query: Option<&str>) -> Result<(), Denied> {
    let filtered = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(k, _)| k == "filters")
        .filter_map(|(_, v)| serde_json::from_str::<Value>(&v).ok())
        .any(|f| {
            // `{"label": ["k=v"]}`, or the older `{"label": {"k=v": true}}`.
            let labels: Vec<&str> = match f.get("label") {
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                Some(Value::Object(o)) => o.keys().map(String::as_str).collect(),
                _ => Vec::new(),
            };
            labels.iter().any(|l| {
                l.strip_prefix(WORKER_LABEL)
                    .is_some_and(|rest| rest.starts_with('='))
            })
        });
    if filtered {
        Ok(())
    } else {
        Err(Denied::new(format!(
            "container lists and events must filter on the label {WORKER_LABEL}=<worker>"
        )))
    }
}

/// Whether a container's labels mark it as a heist sandbox container.
pub fn is_sandbox_container(inspect: &Value) -> bool {
    inspect
        .pointer("/Config/Labels")
        .and_then(Value::as_object)
        .is_some_and(|labels| labels.contains_key(WORKER_LABEL))
}

/// A user the engine runs a process as: `uid[:gid]`, numeric, never root.
fn check_user(what: &str, user: Option<&Value>) -> Result<(), Denied> {
    let user = user.and_then(Value::as_str).unwrap_or_default();
    let uid = user.split(':').next().unwrap_or_default();
    match uid.parse::<u32>() {
        Ok(uid) if uid != 0 => Ok(()),
        _ => Err(Denied(format!(
            "{what} must run as a numeric non-root user (uid:gid), not {user:?}"
        ))),
    }
}

/// Whether a JSON value is its type's empty value (what an unset field serializes to).
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// Refuses any key outside `allowed` that is set to something.
fn only_keys(what: &str, obj: &Map<String, Value>, allowed: &[&str]) -> Result<(), Denied> {
    match obj
        .iter()
        .find(|(k, v)| !allowed.contains(&k.as_str()) && !is_empty(v))
    {
        Some((k, _)) => Err(Denied(format!("{what}: {k} may not be set"))),
        None => Ok(()),
    }
}

/// The body of `POST /containers/{id}/exec`: a non-root, unprivileged command.
pub fn check_exec(body: &Value) -> Result<(), Denied> {
    let obj = body
        .as_object()
        .ok_or_else(|| Denied::new("an exec body must be a JSON object"))?;
    only_keys(
        "exec",
        obj,
        &[
            "AttachStdin",
            "AttachStdout",
            "AttachStderr",
            "Tty",
            "Cmd",
            "Env",
            "WorkingDir",
            "User",
            "DetachKeys",
            "ConsoleSize",
        ],
    )?;
    check_user("an exec", obj.get("User"))
}

/// What a session container may be: the sandbox image, labelled, non-root, read-only, no
/// capabilities, no-new-privileges, on the configured network, with limits, and bind mounts
/// only of directories beneath the workspaces directory.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The only image containers may be made from.
    pub image: String,
    /// The only network mode they may have.
    pub network: String,
    /// The workspaces directory as the gate sees it.
    pub workspaces: PathBuf,
    /// The same directory as the engine's host sees it (bind sources are rewritten to it).
    pub host_workspaces: PathBuf,
}

impl Policy {
    /// Checks a `POST /containers/create` body and rewrites its bind sources to host paths.
    pub fn check_create(&self, body: &mut Value) -> Result<(), Denied> {
        let obj = body
            .as_object_mut()
            .ok_or_else(|| Denied::new("a container body must be a JSON object"))?;
        only_keys(
            "container",
            obj,
            &[
                "Image",
                "User",
                "Entrypoint",
                "Cmd",
                "WorkingDir",
                "Hostname",
                "NetworkDisabled",
                "Labels",
                "HostConfig",
                "Env",
                "Tty",
                "OpenStdin",
                "StdinOnce",
                "AttachStdin",
                "AttachStdout",
                "AttachStderr",
                "StopSignal",
                "StopTimeout",
            ],
        )?;
        if obj.get("Image").and_then(Value::as_str) != Some(self.image.as_str()) {
            return Err(Denied(format!(
                "containers must be made from the sandbox image {}",
                self.image
            )));
        }
        let labelled = obj
            .get("Labels")
            .and_then(Value::as_object)
            .is_some_and(|l| l.get(WORKER_LABEL).and_then(Value::as_str).is_some());
        if !labelled {
            return Err(Denied(format!(
                "containers must carry the label {WORKER_LABEL}"
            )));
        }
        check_user("a container", obj.get("User"))?;
        let host = obj
            .get_mut("HostConfig")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| Denied::new("a container needs a HostConfig with its limits"))?;
        self.check_host_config(host)
    }

    fn check_host_config(&self, host: &mut Map<String, Value>) -> Result<(), Denied> {
        only_keys(
            "HostConfig",
            host,
            &[
                "Mounts",
                "NetworkMode",
                "ReadonlyRootfs",
                "Tmpfs",
                "CapDrop",
                "SecurityOpt",
                "Init",
                "Memory",
                "MemorySwap",
                "PidsLimit",
                "NanoCpus",
                "CpuQuota",
                "CpuPeriod",
                "Ulimits",
                "AutoRemove",
            ],
        )?;
        let require = |ok: bool, rule: &str| {
            if ok {
                Ok(())
            } else {
                Err(Denied(format!("HostConfig: {rule}")))
            }
        };
        require(
            host.get("NetworkMode").and_then(Value::as_str) == Some(self.network.as_str()),
            &format!("NetworkMode must be {}", self.network),
        )?;
        require(
            host.get("ReadonlyRootfs") == Some(&Value::Bool(true)),
            "ReadonlyRootfs must be true",
        )?;
        let strings = |key: &str| -> Vec<String> {
            host.get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        require(
            strings("CapDrop").iter().any(|c| c == "ALL"),
            "CapDrop must include ALL",
        )?;
        let opts = strings("SecurityOpt");
        require(
            opts.iter()
                .any(|o| o == "no-new-privileges" || o == "no-new-privileges:true")
                && opts.iter().all(|o| o.starts_with("no-new-privileges")),
            "SecurityOpt must be no-new-privileges and nothing else",
        )?;
        for limit in ["Memory", "PidsLimit"] {
            require(
                host.get(limit)
                    .and_then(Value::as_i64)
                    .is_some_and(|v| v > 0),
                &format!("{limit} must be set"),
            )?;
        }
        if let Some(tmpfs) = host.get("Tmpfs").and_then(Value::as_object) {
            require(
                tmpfs.keys().all(|k| k == "/tmp"),
                "Tmpfs may only mount /tmp",
            )?;
        }
        if let Some(mounts) = host.get_mut("Mounts").and_then(Value::as_array_mut) {
            for mount in mounts {
                self.check_mount(mount)?;
            }
        }
        Ok(())
    }

    /// A bind mount of a directory beneath the workspaces directory; its source becomes the
    /// host's path of that directory.
    fn check_mount(&self, mount: &mut Value) -> Result<(), Denied> {
        let obj = mount
            .as_object_mut()
            .ok_or_else(|| Denied::new("a mount must be a JSON object"))?;
        only_keys("mount", obj, &["Type", "Source", "Target", "ReadOnly"])?;
        if obj.get("Type").and_then(Value::as_str) != Some("bind") {
            return Err(Denied::new("only bind mounts are allowed"));
        }
        let source = obj
            .get("Source")
            .and_then(Value::as_str)
            .ok_or_else(|| Denied::new("a bind mount needs a Source"))?;
        let host = self.host_path(Path::new(source))?;
        obj.insert(
            "Source".to_owned(),
            Value::String(host.display().to_string()),
        );
        Ok(())
    }

    /// `path` (as the gate sees it) resolved, checked to be a directory beneath the
    /// workspaces directory, and expressed as the host sees it.
    fn host_path(&self, path: &Path) -> Result<PathBuf, Denied> {
        let outside = || {
            Denied(format!(
                "bind mounts must be directories beneath {}, not {}",
                self.workspaces.display(),
                path.display()
            ))
        };
        if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            return Err(outside());
        }
        let real = std::fs::canonicalize(path).map_err(|_| outside())?;
        let rest = real.strip_prefix(&self.workspaces).map_err(|_| outside())?;
        if rest.as_os_str().is_empty() || !real.is_dir() {
            return Err(outside());
        }
        Ok(self.host_workspaces.join(rest))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn routes_are_the_backends_calls_only() {
        let ok = [
            (Method::GET, "/v1.41/_ping"),
            (Method::GET, "/version"),
            (Method::GET, "/v1.41/images/heist-sandbox:latest/json"),
            (Method::GET, "/images/registry.example/a/b:1/json"),
            (Method::GET, "/v1.41/containers/json"),
            (Method::POST, "/v1.41/containers/create"),
            (Method::POST, "/v1.41/containers/abc/start"),
            (Method::POST, "/containers/abc/exec"),
            (Method::DELETE, "/containers/abc"),
            (Method::POST, "/exec/e1/start"),
            (Method::GET, "/exec/e1/json"),
            (Method::GET, "/v1.41/events"),
        ];
        for (m, p) in ok {
            assert!(route(&m, p).is_ok(), "{m} {p}");
        }
        let refused = [
            (Method::POST, "/v1.41/images/create"),
            (Method::POST, "/containers/abc/update"),
            (Method::GET, "/containers/abc/archive"),
            (Method::PUT, "/containers/abc/archive"),
            (Method::POST, "/containers/abc/attach"),
            (Method::GET, "/volumes"),
            (Method::POST, "/networks/create"),
            (Method::POST, "/build"),
            (Method::GET, "/v1.41/../containers/json"),
            (Method::POST, "/swarm/init"),
            (Method::POST, "/exec/e1/resize"),
            (Method::POST, "/events"),
        ];
        for (m, p) in refused {
            let err = route(&m, p).expect_err(p);
            assert!(err.0.contains("does not allow"), "{}", err.0);
        }
        assert_eq!(
            route(&Method::POST, "/v1.41/containers/abc/exec"),
            Ok(Route::Container {
                id: "abc",
                exec: true
            })
        );
    }

    #[test]
    fn lists_must_filter_on_the_worker_label() {
        let filters = |f: &str| {
            form_urlencoded::Serializer::new(String::new())
                .append_pair("all", "true")
                .append_pair("filters", f)
                .finish()
        };
        assert!(check_list(Some(&filters(r#"{"label":["io.heist.worker=w1-abc"]}"#))).is_ok());
        assert!(check_list(Some(&filters(r#"{"label":{"io.heist.worker=w1":true}}"#))).is_ok());
        assert!(check_list(Some(&filters(r#"{"label":["io.heist.workerx=1"]}"#))).is_err());
        assert!(check_list(Some(&filters(r#"{"name":["x"]}"#))).is_err());
        assert!(check_list(Some("all=true")).is_err());
        assert!(check_list(None).is_err());
    }

    #[test]
    fn execs_run_unprivileged_as_a_numeric_non_root_user() {
        let ok = json!({"Cmd": ["sh"], "User": "10001:10001", "AttachStdout": true});
        assert!(check_exec(&ok).is_ok());
        for bad in [
            json!({"Cmd": ["sh"], "User": "0:0"}),
            json!({"Cmd": ["sh"], "User": "root"}),
            json!({"Cmd": ["sh"]}),
            json!({"Cmd": ["sh"], "User": "10001", "Privileged": true}),
        ] {
            assert!(check_exec(&bad).is_err(), "{bad}");
        }
        assert!(check_exec(&json!({"Cmd": ["sh"], "User": "10001", "Privileged": false})).is_ok());
    }

    struct Dirs {
        _tmp: tempfile::TempDir,
        policy: Policy,
        session: PathBuf,
    }

    fn dirs() -> Dirs {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tmp.path().join("ws/w1/sessions/s1")).expect("mkdir");
        std::fs::create_dir_all(tmp.path().join("outside")).expect("mkdir");
        let workspaces = tmp.path().join("ws").canonicalize().expect("canonical");
        let session = workspaces.join("w1/sessions/s1");
        Dirs {
            policy: Policy {
                image: "heist-sandbox:latest".into(),
                network: "none".into(),
                workspaces,
                host_workspaces: PathBuf::from("/var/lib/docker/volumes/x/_data"),
            },
            session,
            _tmp: tmp,
        }
    }

    fn good_body(source: &Path) -> Value {
        json!({
            "Image": "heist-sandbox:latest",
            "User": "65534:65534",
            "Entrypoint": ["sleep"],
            "Cmd": ["infinity"],
            "Labels": {"io.heist.worker": "w1-abc", "io.heist.session": "s1"},
            "NetworkDisabled": true,
            "HostConfig": {
                "Mounts": [{"Type": "bind", "Source": source, "Target": "/workspace", "ReadOnly": false}],
                "NetworkMode": "none",
                "ReadonlyRootfs": true,
                "Tmpfs": {"/tmp": "rw,size=1m"},
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges:true"],
                "Init": true,
                "Memory": 1_000_000,
                "MemorySwap": 1_000_000,
                "PidsLimit": 64,
            }
        })
    }

    #[test]
    fn a_confined_container_passes_with_its_binds_rewritten_to_host_paths() {
        let d = dirs();
        let mut body = good_body(&d.session);
        d.policy.check_create(&mut body).expect("allowed");
        assert_eq!(
            body.pointer("/HostConfig/Mounts/0/Source"),
            Some(&json!("/var/lib/docker/volumes/x/_data/w1/sessions/s1"))
        );
    }

    /// A change to a good container body.
    type Loosen = Box<dyn Fn(&mut Value)>;

    #[test]
    fn anything_that_loosens_the_container_is_refused() {
        let d = dirs();
        let outside = d.session.parent().expect("p").join("../../../outside");
        let link = d.session.join("escape");
        std::os::unix::fs::symlink("/", &link).expect("symlink");
        let cases: Vec<(&str, Loosen)> = vec![
            (
                "privileged",
                Box::new(|b| b["HostConfig"]["Privileged"] = json!(true)),
            ),
            (
                "cap add",
                Box::new(|b| b["HostConfig"]["CapAdd"] = json!(["SYS_ADMIN"])),
            ),
            (
                "no cap drop",
                Box::new(|b| b["HostConfig"]["CapDrop"] = json!([])),
            ),
            (
                "pid host",
                Box::new(|b| b["HostConfig"]["PidMode"] = json!("host")),
            ),
            (
                "network host",
                Box::new(|b| b["HostConfig"]["NetworkMode"] = json!("host")),
            ),
            (
                "binds",
                Box::new(|b| b["HostConfig"]["Binds"] = json!(["/:/host"])),
            ),
            (
                "devices",
                Box::new(|b| b["HostConfig"]["Devices"] = json!([{"PathOnHost": "/dev/sda"}])),
            ),
            (
                "writable root",
                Box::new(|b| b["HostConfig"]["ReadonlyRootfs"] = json!(false)),
            ),
            (
                "seccomp off",
                Box::new(|b| {
                    b["HostConfig"]["SecurityOpt"] =
                        json!(["no-new-privileges", "seccomp=unconfined"])
                }),
            ),
            (
                "no limits",
                Box::new(|b| {
                    b["HostConfig"].as_object_mut().map(|h| h.remove("Memory"));
                }),
            ),
            (
                "other image",
                Box::new(|b| b["Image"] = json!("debian:bookworm-slim")),
            ),
            ("root", Box::new(|b| b["User"] = json!("0:0"))),
            ("unlabelled", Box::new(|b| b["Labels"] = json!({}))),
            (
                "networks",
                Box::new(|b| b["NetworkingConfig"] = json!({"EndpointsConfig": {"bridge": {}}})),
            ),
            (
                "volume mount",
                Box::new(|b| b["HostConfig"]["Mounts"][0]["Type"] = json!("volume")),
            ),
            (
                "root bind",
                Box::new(|b| b["HostConfig"]["Mounts"][0]["Source"] = json!("/")),
            ),
            (
                "dotdot bind",
                Box::new(move |b| b["HostConfig"]["Mounts"][0]["Source"] = json!(outside)),
            ),
            (
                "symlink bind",
                Box::new(move |b| b["HostConfig"]["Mounts"][0]["Source"] = json!(link)),
            ),
            (
                "propagation",
                Box::new(|b| {
                    b["HostConfig"]["Mounts"][0]["BindOptions"] = json!({"Propagation": "rshared"})
                }),
            ),
            (
                "tmpfs elsewhere",
                Box::new(|b| b["HostConfig"]["Tmpfs"] = json!({"/etc": ""})),
            ),
        ];
        for (name, loosen) in cases {
            let mut body = good_body(&d.session);
            loosen(&mut body);
            assert!(d.policy.check_create(&mut body).is_err(), "{name} passed");
        }
    }

    #[test]
    fn sandbox_containers_are_known_by_their_label() {
        assert!(is_sandbox_container(
            &json!({"Config": {"Labels": {"io.heist.worker": "w"}}})
        ));
        assert!(!is_sandbox_container(
            &json!({"Config": {"Labels": {"other": "w"}}})
        ));
        assert!(!is_sandbox_container(&json!({})));
    }
}
