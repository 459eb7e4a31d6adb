//! `GET /v1/events`: task and campaign transitions as server-sent events, optionally of one
//! device, task or campaign, so a management server follows progress without polling.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use super::error::ApiError;
use super::AppState;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventsQuery {
    device_id: Option<String>,
    fota_id: Option<String>,
    campaign_id: Option<String>,
}

pub async fn events(
    State(app): State<AppState>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(q) = query?;
    let q = std::sync::Arc::new(q);
    let wanted = std::sync::Arc::clone(&q);
    let tasks = BroadcastStream::new(app.engine.subscribe()).filter_map(move |item| {
        let q = &wanted;
        let event = match item {
            Ok(ev) => {
                let wanted = q.device_id.as_ref().is_none_or(|d| *d == ev.device_id)
                    && q.fota_id.as_ref().is_none_or(|f| *f == ev.fota_id)
                    && q.campaign_id
                        .as_ref()
                        .is_none_or(|c| Some(c) == ev.campaign.as_ref());
                wanted.then(|| encode("task", &*ev))
            }
            Err(BroadcastStreamRecvError::Lagged(n)) => Some(lagged(n)),
        };
        std::future::ready(event.map(Ok))
    });
    // Campaign transitions go to those who follow campaigns, not one device or task.
    let campaigns = BroadcastStream::new(app.fleet.subscribe()).filter_map(move |item| {
        let event = match item {
            Ok(ev) => {
                let wanted = q.device_id.is_none()
                    && q.fota_id.is_none()
                    && q.campaign_id.as_ref().is_none_or(|c| *c == ev.campaign_id);
                wanted.then(|| encode("campaign", &*ev))
            }
            Err(BroadcastStreamRecvError::Lagged(n)) => Some(lagged(n)),
        };
        std::future::ready(event.map(Ok))
    });
    let stream = futures_util::stream::select(tasks, campaigns)
        // Shutdown ends the stream so the graceful shutdown does not wait for it.
        .take_until(app.cancel.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn encode(kind: &'static str, data: &impl serde::Serialize) -> Event {
    Event::default()
        .event(kind)
        .json_data(data)
        .unwrap_or_else(|_| Event::default().comment("unencodable event"))
}

/// The subscriber fell behind; say how many transitions it missed.
fn lagged(n: u64) -> Event {
    Event::default().event("lagged").data(n.to_string())
}
