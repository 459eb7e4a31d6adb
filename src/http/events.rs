//! `GET /v1/events`: task transitions as server-sent events, optionally of one device or
//! task, so a management server follows progress without polling.

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
}

pub async fn events(
    State(app): State<AppState>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(q) = query?;
    let stream = BroadcastStream::new(app.engine.subscribe())
        .filter_map(move |item| {
            let event = match item {
                Ok(ev) => {
                    let wanted = q.device_id.as_ref().is_none_or(|d| *d == ev.device_id)
                        && q.fota_id.as_ref().is_none_or(|f| *f == ev.fota_id);
                    wanted.then(|| {
                        Event::default()
                            .event("task")
                            .json_data(&*ev)
                            .unwrap_or_else(|_| Event::default().comment("unencodable event"))
                    })
                }
                // The subscriber fell behind; say how many transitions it missed.
                Err(BroadcastStreamRecvError::Lagged(n)) => {
                    Some(Event::default().event("lagged").data(n.to_string()))
                }
            };
            std::future::ready(event.map(Ok))
        })
        // Shutdown ends the stream so the graceful shutdown does not wait for it.
        .take_until(app.cancel.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
