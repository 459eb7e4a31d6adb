//! One paging rule for every list route: `limit` defaults to 100 and must be 1 to 1000; more
//! or less is refused (400), never silently clamped, so a client learns the bound.

use super::error::ApiError;

pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

/// The page size a list answers with.
pub fn limit(asked: Option<usize>) -> Result<usize, ApiError> {
    match asked.unwrap_or(DEFAULT_PAGE) {
        n @ 1..=MAX_PAGE => Ok(n),
        _ => Err(ApiError::bad_request(
            "invalid-parameter",
            format!("limit: between 1 and {MAX_PAGE}"),
        )),
    }
}

/// `?cursor=&limit=` of a list route with no other parameter.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub cursor: Option<String>,
    pub limit: Option<usize>,
}
