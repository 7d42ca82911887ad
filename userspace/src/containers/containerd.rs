//! containerd discovery through its gRPC API (containerd-client): the
//! running tasks of every followed namespace on (re)connect, then the event
//! service for task starts and exits and container removals. One
//! subscription carries every namespace's events, so a namespace created
//! later needs nothing of its own.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use containerd_client::{
    events::{ContainerDelete, TaskDelete, TaskExit, TaskStart},
    services::v1::{
        containers_client::ContainersClient, events_client::EventsClient, namespaces_client::NamespacesClient,
        tasks_client::TasksClient, Container, GetContainerRequest, GetRequest, ListContainersRequest,
        ListNamespacesRequest, SubscribeRequest,
    },
    tonic::{transport::Channel, Code, Request},
    types::v1::Status,
};
use futures_util::StreamExt as _;
use prost::Message as _;

use super::Discovered;
use crate::{daemon::Daemon, sandbox::ContainerInfo};

pub const RUNTIME: &str = "containerd";
/// Where containerd listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";
/// Docker's own namespaces (containers, plugins): its containers are
/// discovered through the Docker API, with their Docker names and labels.
pub const DOCKER_NAMESPACES: [&str; 2] = ["moby", "plugins.moby"];
/// The label Docker puts on every container it runs through containerd (in
/// whatever namespace it was told to use); its other labels stay with Docker.
const DOCKER_BUNDLE_LABEL: &str = "com.docker/engine.bundle.path";

/// Which containerd namespaces are followed: the ones named, or every one
/// but Docker's when none is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespaces(pub Vec<String>);

impl Namespaces {
    pub fn follows(&self, namespace: &str) -> bool {
        if self.0.is_empty() {
            !DOCKER_NAMESPACES.contains(&namespace)
        } else {
            self.0.iter().any(|name| name == namespace)
        }
    }
}

/// Follows the containerd at `socket` until the daemon stops, and
/// reconnects when it goes away (or is not there yet).
pub async fn watch(daemon: Arc<Daemon>, socket: PathBuf, namespaces: Namespaces) {
    super::keep_following(RUNTIME, &socket, || follow(&daemon, &socket, &namespaces)).await;
}

async fn follow(daemon: &Daemon, socket: &Path, namespaces: &Namespaces) -> anyhow::Result<()> {
    let channel = containerd_client::connect(socket).await.context("connecting to containerd")?;
    // Subscribed before listing, so nothing that happens while listing is
    // missed (handling a start twice is harmless). containerd answers a
    // subscription with its first event, so it is awaited after the
    // listing; dropping the set cancels it.
    let filters = ["/tasks/start", "/tasks/exit", "/tasks/delete", "/containers/delete"]
        .map(|topic| format!("topic=={topic:?}"))
        .to_vec();
    let mut subscription = tokio::task::JoinSet::new();
    let mut events = EventsClient::new(channel.clone());
    subscription.spawn(async move { events.subscribe(SubscribeRequest { filters }).await });
    tokio::task::yield_now().await;

    let listed = NamespacesClient::new(channel.clone())
        .list(ListNamespacesRequest::default())
        .await
        .context("listing containerd namespaces")?
        .into_inner()
        .namespaces;
    let mut running = Vec::new();
    for namespace in listed.into_iter().map(|n| n.name).filter(|n| namespaces.follows(n)) {
        let containers = ContainersClient::new(channel.clone())
            .list(in_namespace(&namespace, ListContainersRequest::default())?)
            .await
            .with_context(|| format!("listing the containers of namespace {namespace}"))?
            .into_inner()
            .containers;
        for container in containers {
            if let Some(found) = inspect(&channel, &namespace, container).await? {
                running.push(found);
            }
        }
    }
    tracing::info!(containers = running.len(), socket = %socket.display(), "following containerd");
    super::reconcile(daemon, RUNTIME, running).await;

    let mut events = subscription
        .join_next()
        .await
        .context("containerd subscription")?
        .context("containerd subscription")?
        .context("subscribing to containerd events")?
        .into_inner();
    while let Some(envelope) = events.next().await {
        let envelope = envelope.context("reading containerd events")?;
        let (namespace, Some(event)) = (envelope.namespace, envelope.event) else { continue };
        if !namespaces.follows(&namespace) {
            continue;
        }
        let payload = event.value.as_slice();
        match envelope.topic.as_str() {
            "/tasks/start" => {
                let start = TaskStart::decode(payload)?;
                // Gone again by now (a short-lived task): its exit follows.
                if let Some(found) = get(&channel, &namespace, &start.container_id).await.unwrap_or(None) {
                    super::started(daemon, found).await;
                }
            }
            // Exits of `ctr task exec` processes carry their own id.
            "/tasks/exit" => {
                let exit = TaskExit::decode(payload)?;
                if exit.id == exit.container_id {
                    super::stopped(daemon, RUNTIME, &namespace, &exit.container_id, "stopped").await;
                }
            }
            "/tasks/delete" => {
                let delete = TaskDelete::decode(payload)?;
                if delete.id.is_empty() || delete.id == delete.container_id {
                    super::stopped(daemon, RUNTIME, &namespace, &delete.container_id, "stopped").await;
                }
            }
            "/containers/delete" => {
                let delete = ContainerDelete::decode(payload)?;
                super::stopped(daemon, RUNTIME, &namespace, &delete.id, "was removed").await;
            }
            _ => {}
        }
    }
    anyhow::bail!("the containerd event stream ended")
}

/// A container by id, if its task is running.
async fn get(channel: &Channel, namespace: &str, id: &str) -> anyhow::Result<Option<Discovered>> {
    let request = in_namespace(namespace, GetContainerRequest { id: id.to_owned() })?;
    let container = match ContainersClient::new(channel.clone()).get(request).await {
        Ok(response) => response.into_inner().container,
        Err(status) if status.code() == Code::NotFound => return Ok(None),
        Err(status) => return Err(status).with_context(|| format!("getting container {namespace}/{id}")),
    };
    match container {
        Some(container) => inspect(channel, namespace, container).await,
        None => Ok(None),
    }
}

/// A container's identity and its task's pid; None if no task runs, or if
/// it is Docker's.
async fn inspect(channel: &Channel, namespace: &str, container: Container) -> anyhow::Result<Option<Discovered>> {
    if container.labels.contains_key(DOCKER_BUNDLE_LABEL) {
        tracing::info!(namespace, id = %container.id, "a Docker container: left to Docker discovery");
        return Ok(None);
    }
    let request = in_namespace(namespace, GetRequest { container_id: container.id.clone(), exec_id: String::new() })?;
    let process = match TasksClient::new(channel.clone()).get(request).await {
        Ok(response) => response.into_inner().process,
        Err(status) if status.code() == Code::NotFound => return Ok(None),
        Err(status) => {
            return Err(status).with_context(|| format!("getting the task of container {namespace}/{}", container.id))
        }
    };
    let Some(process) = process else { return Ok(None) };
    let running = [Status::Running, Status::Paused, Status::Pausing].map(|s| s as i32).contains(&process.status);
    if !running || process.pid == 0 {
        return Ok(None);
    }
    let info = ContainerInfo {
        runtime: RUNTIME.to_owned(),
        // containerd has no names; `sluice.sandbox` overrides it as for Docker.
        name: container.id.clone(),
        id: container.id,
        image: container.image,
        labels: container.labels.into_iter().collect(),
        namespace: namespace.to_owned(),
    };
    Ok(Some(Discovered { info, pid: process.pid }))
}

/// A request for one namespace's objects.
fn in_namespace<T>(namespace: &str, message: T) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    let value = namespace.parse().with_context(|| format!("namespace {namespace:?} is not a header value"))?;
    request.metadata_mut().insert("containerd-namespace", value);
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_namespace_but_dockers_unless_some_are_named() {
        let all = Namespaces::default();
        assert!(all.follows("default") && all.follows("k8s.io"));
        assert!(!all.follows("moby") && !all.follows("plugins.moby"));
        let named = Namespaces(vec!["agents".to_owned(), "moby".to_owned()]);
        assert!(named.follows("agents") && named.follows("moby") && !named.follows("default"));
    }
}
