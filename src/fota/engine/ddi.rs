//! The hawkBit device API's side of the engine: what a device's base resource shows, its
//! actions by action id, feedback on deployments and cancellations, and configuration data.
//! A DDI action is a FOTA task; this file only translates.

use std::collections::BTreeMap;

use super::*;
use crate::fota::ddi::{action_id, Feedback, Step};
use crate::model::device::{MAX_LABELS, MAX_LABEL_KEY, MAX_LABEL_VALUE};

/// Tasks of one device read per page when looking for an action.
const PAGE: usize = 500;

/// What a device's base resource shows.
pub struct Controller {
    /// A task to deploy, or when to ask again.
    pub work: Work,
    /// The device's latest task, cancelled by an operator after it was handed over and not
    /// yet answered by the device.
    pub cancel: Option<FotaTask>,
    /// The device's latest task that succeeded.
    pub installed: Option<FotaTask>,
    /// The registry holds no attributes of the device: ask for its configuration data.
    pub attributes_wanted: bool,
}

/// How configuration data changes the device's attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigMode {
    Merge,
    Replace,
    Remove,
}

impl ConfigMode {
    pub fn parse(s: &str) -> Option<ConfigMode> {
        match s {
            "merge" => Some(ConfigMode::Merge),
            "replace" => Some(ConfigMode::Replace),
            "remove" => Some(ConfigMode::Remove),
            _ => None,
        }
    }
}

impl Engine {
    /// The base resource: the device's work request, and what else it must hear of.
    pub async fn ddi_poll(&self, device: &str, proof: Proof<'_>) -> Result<Controller, FotaError> {
        let work = self.work(device, proof).await?;
        let tasks = self.device_tasks(device).await?;
        // The latest task: made last, and of those made in the same millisecond the one that
        // ended last (or has not).
        let latest = tasks
            .iter()
            .max_by_key(|t| (t.created_ms, t.finished_ms.unwrap_or(i64::MAX)));
        let cancel = match &work {
            Work::Task { .. } => None,
            Work::Nothing { .. } => latest.filter(|t| t.awaits_cancel_answer()).cloned(),
        };
        let installed = tasks
            .iter()
            .filter(|t| t.status == Status::Succeeded)
            .max_by_key(|t| t.finished_ms)
            .cloned();
        let attributes_wanted = self
            .store
            .get_device(device)
            .await?
            .is_none_or(|d| d.attributes.is_empty());
        Ok(Controller {
            work,
            cancel,
            installed,
            attributes_wanted,
        })
    }

    /// Every task of `device`, oldest first.
    async fn device_tasks(&self, device: &str) -> Result<Vec<FotaTask>, FotaError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .list_tasks(Some(device), after.as_deref(), PAGE)
                .await?;
            let full = page.len() == PAGE;
            after = page.last().map(|t| t.id.clone());
            all.extend(page);
            if !full {
                return Ok(all);
            }
        }
    }

    /// The id of `device`'s task known to it as `action`.
    async fn action_task(&self, device: &str, action: u32) -> Result<String, FotaError> {
        // Newest first: were two of a device's task ids to share an action id, the one the
        // device can be working on wins.
        self.device_tasks(device)
            .await?
            .into_iter()
            .rev()
            .find(|t| action_id(&t.id) == action)
            .map(|t| t.id)
            .ok_or_else(|| FotaError::ActionNotFound {
                device: device.to_owned(),
                action,
            })
    }

    /// The action `deploymentBase` describes: a task handed to the device (running or
    /// finished since); one still waiting was never offered and is not found.
    pub async fn ddi_deployment(
        &self,
        device: &str,
        action: u32,
        proof: Proof<'_>,
    ) -> Result<(FotaTask, Arc<FirmwareRecord>), FotaError> {
        check_device(device)?;
        self.identify(device, proof).await?;
        let t = self.task(&self.action_task(device, action).await?).await?;
        if t.started_ms.is_none() {
            return Err(FotaError::ActionNotFound {
                device: device.to_owned(),
                action,
            });
        }
        let record = self.repo.resolve_any(&t.firmware).await?;
        let record = self.repo.with_all_digests(record).await?;
        Ok((t, record))
    }

    /// A succeeded action (`installedBase`).
    pub async fn ddi_installed(
        &self,
        device: &str,
        action: u32,
        proof: Proof<'_>,
    ) -> Result<(FotaTask, Arc<FirmwareRecord>), FotaError> {
        let (t, record) = self.ddi_deployment(device, action, proof).await?;
        if t.status != Status::Succeeded {
            return Err(FotaError::ActionNotFound {
                device: device.to_owned(),
                action,
            });
        }
        Ok((t, record))
    }

    /// A cancelled action awaiting the device's answer (`cancelAction`).
    pub async fn ddi_cancellation(
        &self,
        device: &str,
        action: u32,
        proof: Proof<'_>,
    ) -> Result<FotaTask, FotaError> {
        check_device(device)?;
        self.identify(device, proof).await?;
        let t = self.task(&self.action_task(device, action).await?).await?;
        if !t.awaits_cancel_answer() {
            return Err(FotaError::ActionNotFound {
                device: device.to_owned(),
                action,
            });
        }
        Ok(t)
    }

    /// Feedback on a deployment, applied as the LwM2M report it amounts to, with its details
    /// in the task's history.
    pub async fn ddi_feedback(
        &self,
        device: &str,
        action: u32,
        feedback: &Feedback,
        proof: Proof<'_>,
    ) -> Result<FotaTask, FotaError> {
        let step = feedback.step()?;
        self.change_action(device, action, proof, |t, now| {
            let detail = feedback.detail();
            match &step {
                Step::Report(report) => {
                    let deferred_until =
                        now.saturating_add(self.config.deferred_retry.0.as_millis() as i64);
                    let entries = t.history.len();
                    let last = t.history.last().cloned();
                    t.apply(report, deferred_until, now)?;
                    if t.history.len() != entries || t.history.last() != last.as_ref() {
                        t.annotate(detail);
                        Ok(())
                    } else {
                        Ok(t.note(feedback.execution.as_str(), detail, now)?)
                    }
                }
                Step::Note(reason) => Ok(t.note(reason, detail, now)?),
            }
        })
        .await
    }

    /// The device's answer to a cancellation, kept in the task's history.
    pub async fn ddi_cancel_feedback(
        &self,
        device: &str,
        action: u32,
        feedback: &Feedback,
        proof: Proof<'_>,
    ) -> Result<FotaTask, FotaError> {
        self.change_action(device, action, proof, |t, now| {
            Ok(t.answer_cancel(feedback.cancel_answer(), feedback.detail(), now)?)
        })
        .await
    }

    /// Applies `change` to the device's task known as `action` and stores it, on a fresh
    /// read for as long as others store it first.
    async fn change_action(
        &self,
        device: &str,
        action: u32,
        proof: Proof<'_>,
        change: impl Fn(&mut FotaTask, i64) -> Result<(), FotaError>,
    ) -> Result<FotaTask, FotaError> {
        check_device(device)?;
        self.identify(device, proof).await?;
        let id = self.action_task(device, action).await?;
        self.seen(device, None).await?;
        retried(|| async {
            let _g = self.lock_task(&id).await;
            let mut t = self.task(&id).await?;
            let before = t.clone();
            change(&mut t, self.now_ms())?;
            self.commit(&before, &mut t).await?;
            Ok(t)
        })
        .await
    }

    /// Configuration data from the device's client, into its attributes in the registry.
    pub async fn ddi_config_data(
        &self,
        device: &str,
        mode: ConfigMode,
        data: &BTreeMap<String, String>,
        proof: Proof<'_>,
    ) -> Result<(), FotaError> {
        check_device(device)?;
        self.identify(device, proof).await?;
        for (k, v) in data {
            let key_ok = !k.is_empty() && k.len() <= MAX_LABEL_KEY;
            if !key_ok || v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
                return Err(FotaError::Attributes(format!(
                    "data: keys of 1 to {MAX_LABEL_KEY} bytes, values of at most \
                     {MAX_LABEL_VALUE} bytes without control characters ({k:?})"
                )));
            }
        }
        let current = self
            .store
            .get_device(device)
            .await?
            .map(|d| d.attributes)
            .unwrap_or_default();
        let attributes = match mode {
            ConfigMode::Replace => data.clone(),
            ConfigMode::Merge => {
                let mut a = current;
                a.extend(data.iter().map(|(k, v)| (k.clone(), v.clone())));
                a
            }
            ConfigMode::Remove => {
                let mut a = current;
                a.retain(|k, _| !data.contains_key(k));
                a
            }
        };
        if attributes.len() > MAX_LABELS {
            return Err(FotaError::Attributes(format!(
                "a device has at most {MAX_LABELS} attributes"
            )));
        }
        let mut patch = serde_json::Map::new();
        patch.insert("attributes".into(), json!(attributes));
        patch.insert("lastSeenMs".into(), self.now_ms().into());
        self.store
            .merge_device(device, &patch, self.now_ms())
            .await?;
        Ok(())
    }

    /// The task's package URI on the listener of `scheme` (`http`, `https`), whatever
    /// protocol it was scheduled for: DDI clients download over HTTP(S).
    pub fn package_uri_on(&self, t: &FotaTask, scheme: &str) -> Option<String> {
        self.bases()
            .iter()
            .find(|(s, _)| *s == scheme)
            .map(|(_, base)| format!("{base}/p/{}/{}", t.id, t.capability))
    }

    /// The public base of the listener of `scheme`.
    pub fn base_of(&self, scheme: &str) -> Option<&str> {
        self.bases()
            .iter()
            .find(|(s, _)| *s == scheme)
            .map(|(_, b)| b.as_str())
    }

    /// The configured DDI tenant.
    pub fn ddi_tenant(&self) -> &str {
        &self.config.ddi_tenant
    }

    /// The polling interval of the configuration.
    pub fn poll_interval(&self) -> Duration {
        self.config.poll_interval.0
    }
}
