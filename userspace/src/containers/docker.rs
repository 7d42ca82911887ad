//! Docker discovery through the Engine API (bollard): the running
//! containers on (re)connect, then the event stream for starts and stops.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use bollard::{
    query_parameters::{EventsOptions, ListContainersOptions},
    Docker, API_DEFAULT_VERSION,
};
use futures_util::StreamExt as _;

use super::Discovered;
use crate::{daemon::Daemon, sandbox::ContainerInfo};

const RUNTIME: &str = "docker";

/// Follows the Docker engine at `socket` until the daemon stops, and
/// reconnects when the engine goes away (containers keep being enforced
/// meanwhile: unknown ones are denied).
pub async fn watch(daemon: Arc<Daemon>, socket: PathBuf) {
    super::keep_following(RUNTIME, &socket, || follow(&daemon, &socket)).await;
}

async fn follow(daemon: &Daemon, socket: &Path) -> anyhow::Result<()> {
    let path = socket.to_str().context("Docker socket path is not UTF-8")?;
    let docker = Docker::connect_with_unix(path, 60, API_DEFAULT_VERSION)
        .context("connecting to the Docker engine")?
        .negotiate_version()
        .await
        .context("asking the Docker engine for its API version")?;
    // Events from before the listing are replayed, so nothing that happens
    // while listing is missed; handling them twice is harmless.
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs().saturating_sub(1);
    let filters = HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        ("event".to_owned(), vec!["start".to_owned(), "die".to_owned(), "destroy".to_owned()]),
    ]);
    let mut events =
        docker.events(Some(EventsOptions { since: Some(since.to_string()), until: None, filters: Some(filters) }));

    let listed = docker
        .list_containers(Some(ListContainersOptions { all: false, ..Default::default() }))
        .await
        .context("listing containers")?;
    let mut running = Vec::new();
    for summary in listed {
        let Some(id) = summary.id else { continue };
        if let Some(found) = inspect(&docker, &id).await? {
            running.push(found);
        }
    }
    tracing::info!(containers = running.len(), "following the Docker engine");
    super::reconcile(daemon, RUNTIME, running).await;

    while let Some(event) = events.next().await {
        let event = event.context("reading Docker events")?;
        let (Some(action), Some(id)) = (event.action.as_deref(), event.actor.and_then(|actor| actor.id)) else {
            continue;
        };
        match action {
            "start" => {
                // Gone again by now (a short-lived container): its die event follows.
                if let Some(found) = inspect(&docker, &id).await.unwrap_or(None) {
                    super::started(daemon, found).await;
                }
            }
            "die" => super::stopped(daemon, RUNTIME, "", &id, "stopped").await,
            "destroy" => super::stopped(daemon, RUNTIME, "", &id, "was removed").await,
            _ => {}
        }
    }
    anyhow::bail!("the Docker event stream ended")
}

/// A running container's identity and init pid; None if it is not running.
async fn inspect(docker: &Docker, id: &str) -> anyhow::Result<Option<Discovered>> {
    let details = match docker.inspect_container(id, None).await {
        Ok(details) => details,
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("inspecting container {id}")),
    };
    let state = details.state.unwrap_or_default();
    let pid = state.pid.and_then(|pid| u32::try_from(pid).ok()).filter(|pid| *pid > 0);
    let (Some(true), Some(pid)) = (state.running, pid) else { return Ok(None) };
    let config = details.config.unwrap_or_default();
    let labels: BTreeMap<String, String> = config.labels.unwrap_or_default().into_iter().collect();
    let info = ContainerInfo {
        runtime: RUNTIME.to_owned(),
        id: details.id.unwrap_or_else(|| id.to_owned()),
        name: details.name.unwrap_or_default().trim_start_matches('/').to_owned(),
        image: config.image.unwrap_or_default(),
        labels,
        namespace: String::new(),
    };
    Ok(Some(Discovered { info, pid }))
}
