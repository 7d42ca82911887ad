//! A client for the control API, used by the CLI.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use tokio::net::UnixStream;

use super::{ApiError, Health, RegisterRequest, SandboxStatus};
use crate::audit::Decision;

pub struct ControlClient {
    socket: PathBuf,
}

impl ControlClient {
    /// A client for `socket`, not yet checked.
    pub fn new(socket: &Path) -> Self {
        Self { socket: socket.to_owned() }
    }

    /// Connects if a daemon is listening on `socket`; `None` if none is.
    pub async fn connect(socket: &Path) -> Option<Self> {
        let client = Self::new(socket);
        client.health().await.ok().map(|_| client)
    }

    pub async fn health(&self) -> anyhow::Result<Health> {
        self.call(Method::GET, "/v1/health", None::<&()>).await
    }

    pub async fn sandboxes(&self) -> anyhow::Result<Vec<SandboxStatus>> {
        self.call(Method::GET, "/v1/sandboxes", None::<&()>).await
    }

    pub async fn register(&self, request: &RegisterRequest) -> anyhow::Result<SandboxStatus> {
        self.call(Method::POST, "/v1/sandboxes", Some(request)).await
    }

    /// The profile a sandbox enforces.
    pub async fn profile(&self, name: &str) -> anyhow::Result<super::ProfileView> {
        self.call(Method::GET, &format!("/v1/sandboxes/{name}/profile"), None::<&()>).await
    }

    /// Replaces a sandbox's profile.
    pub async fn set_profile(
        &self,
        name: &str,
        profile: &crate::sandbox::ProfileSource,
    ) -> anyhow::Result<SandboxStatus> {
        self.call(Method::PUT, &format!("/v1/sandboxes/{name}/profile"), Some(profile)).await
    }

    /// Adds a rule to a sandbox's profile in force.
    pub async fn add_rule(&self, name: &str, rule: &crate::policy::RuleSpec) -> anyhow::Result<SandboxStatus> {
        self.call(Method::POST, &format!("/v1/sandboxes/{name}/rules"), Some(rule)).await
    }

    /// Removes a rule (by name) from a sandbox's profile in force.
    pub async fn remove_rule(&self, name: &str, rule: &str) -> anyhow::Result<SandboxStatus> {
        let rule = rule.replace('%', "%25").replace('/', "%2F").replace(' ', "%20");
        self.call(Method::DELETE, &format!("/v1/sandboxes/{name}/rules/{rule}"), None::<&()>).await
    }

    /// Requests held by `ask` rules.
    pub async fn approvals(&self) -> anyhow::Result<Vec<crate::approvals::Pending>> {
        self.call(Method::GET, "/v1/approvals", None::<&()>).await
    }

    /// Answers a held request; returns what it was.
    pub async fn answer(&self, id: u64, answer: crate::approvals::Answer) -> anyhow::Result<crate::approvals::Pending> {
        self.call(Method::POST, &format!("/v1/approvals/{id}"), Some(&answer)).await
    }

    /// Which rule decides a request for a running sandbox, and why.
    pub async fn explain(
        &self,
        name: &str,
        request: &super::ExplainRequest,
    ) -> anyhow::Result<crate::policy::Explanation> {
        self.call(Method::POST, &format!("/v1/sandboxes/{name}/explain"), Some(request)).await
    }

    /// Revokes a bundle from every sandbox (or restores it); returns the
    /// answer, which lists the sandboxes affected.
    pub async fn revoke_bundle(&self, bundle: &str, revoke: bool) -> anyhow::Result<serde_json::Value> {
        let method = if revoke { Method::POST } else { Method::DELETE };
        self.call(method, &format!("/v1/bundles/{bundle}/revoke"), None::<&()>).await
    }

    /// Reads every sandbox's profile file again.
    pub async fn reload_profiles(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        self.call(Method::POST, "/v1/profiles/reload", None::<&()>).await
    }

    /// Secret names, origins and revocations.
    pub async fn secrets(&self) -> anyhow::Result<Vec<crate::credentials::SecretInfo>> {
        self.call(Method::GET, "/v1/secrets", None::<&()>).await
    }

    /// Sets a secret's value in the daemon (rotation).
    pub async fn set_secret(&self, name: &str, value: &str) -> anyhow::Result<()> {
        let body = serde_json::json!({ "value": value });
        self.call::<serde_json::Value>(Method::PUT, &format!("/v1/secrets/{name}"), Some(&body)).await.map(drop)
    }

    /// Revokes a secret.
    pub async fn revoke_secret(&self, name: &str) -> anyhow::Result<()> {
        self.call::<serde_json::Value>(Method::DELETE, &format!("/v1/secrets/{name}"), None::<&()>).await.map(drop)
    }

    /// Re-reads the daemon's secret sources; returns how many it holds.
    pub async fn reload_secrets(&self) -> anyhow::Result<u64> {
        let answer: serde_json::Value = self.call(Method::POST, "/v1/secrets/reload", None::<&()>).await?;
        Ok(answer["secrets"].as_u64().unwrap_or(0))
    }

    /// The sandbox's CA certificate, PEM.
    pub async fn ca(&self, name: &str) -> anyhow::Result<String> {
        let (status, body) = self.send(Method::GET, &format!("/v1/sandboxes/{name}/ca"), None::<&()>).await?;
        if status.is_success() {
            return Ok(String::from_utf8_lossy(&body).into_owned());
        }
        bail!("{}", api_error(status, &body))
    }

    pub async fn unregister(&self, name: &str) -> anyhow::Result<()> {
        let (status, body) = self.send(Method::DELETE, &format!("/v1/sandboxes/{name}"), None::<&()>).await?;
        if status.is_success() {
            return Ok(());
        }
        bail!("{}", api_error(status, &body))
    }

    /// Follows the decision stream, calling `each` per decision until the
    /// daemon closes the stream or `each` returns false.
    pub async fn follow(&self, sandbox: Option<&str>, mut each: impl FnMut(Decision) -> bool) -> anyhow::Result<()> {
        let path = match sandbox {
            Some(name) => format!("/v1/events?sandbox={name}"),
            None => "/v1/events".to_owned(),
        };
        let mut sender = self.handshake().await?;
        let request =
            Request::builder().method(Method::GET).uri(path).header("host", "sluice").body(Full::new(Bytes::new()))?;
        let mut response = sender.send_request(request).await.context("control API request failed")?;
        let mut pending = Vec::new();
        while let Some(frame) = response.body_mut().frame().await {
            let Ok(data) = frame?.into_data() else { continue };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if let Ok(decision) = serde_json::from_slice::<Decision>(&line) {
                    if !each(decision) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let (status, bytes) = self.send(method, path, body).await?;
        if !status.is_success() {
            bail!("{}", api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).with_context(|| format!("unexpected answer from the daemon to {path}"))
    }

    async fn handshake(&self) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .with_context(|| format!("cannot reach the sluice daemon at {}", self.socket.display()))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut sender = self.handshake().await?;
        let payload = match body {
            Some(body) => Bytes::from(serde_json::to_vec(body)?),
            None => Bytes::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "sluice")
            .header("content-type", "application/json")
            .body(Full::new(payload))?;
        let response = sender.send_request(request).await.context("control API request failed")?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }
}

fn api_error(status: StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(error) => error.error,
        Err(_) => format!("daemon answered {status}"),
    }
}
