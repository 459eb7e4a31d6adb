//! The transports a task's package URI can use (`protocolType`) and how the device's driver
//! follows an update (`upgradeStrategy`).

use serde::{Deserialize, Serialize};

/// The transport of a task's package URI (`protocolType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "COAP")]
    Coap,
    #[serde(rename = "COAPS")]
    Coaps,
    #[serde(rename = "COAP_TCP")]
    CoapTcp,
    #[serde(rename = "COAPS_TCP")]
    CoapsTcp,
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "HTTPS")]
    Https,
}

impl Protocol {
    pub(crate) const ALL: [(Protocol, &'static str, &'static str); 6] = [
        (Protocol::Coap, "COAP", "coap"),
        (Protocol::Coaps, "COAPS", "coaps"),
        (Protocol::CoapTcp, "COAP_TCP", "coap+tcp"),
        (Protocol::CoapsTcp, "COAPS_TCP", "coaps+tcp"),
        (Protocol::Http, "HTTP", "http"),
        (Protocol::Https, "HTTPS", "https"),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|p| p.0 == self).expect("listed").1
    }

    /// The URI scheme, which is also the key of the transport's public base.
    pub fn scheme(self) -> &'static str {
        Self::ALL.iter().find(|p| p.0 == self).expect("listed").2
    }

    /// The protocol type whose URIs use `scheme`.
    pub fn of_scheme(scheme: &str) -> Option<Protocol> {
        Self::ALL.iter().find(|p| p.2 == scheme).map(|p| p.0)
    }

    pub(crate) fn parse(s: &str) -> Option<Protocol> {
        Self::ALL
            .iter()
            .find(|p| p.1.eq_ignore_ascii_case(s))
            .map(|p| p.0)
    }
}

/// How the device's driver follows the update; stored and handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpgradeStrategy {
    WithoutObservations,
    ObservationTrigger,
    ObservationBased,
    SendBased,
}

impl UpgradeStrategy {
    pub(crate) const ALL: [(UpgradeStrategy, &'static str); 4] = [
        (UpgradeStrategy::WithoutObservations, "WithoutObservations"),
        (UpgradeStrategy::ObservationTrigger, "ObservationTrigger"),
        (UpgradeStrategy::ObservationBased, "ObservationBased"),
        (UpgradeStrategy::SendBased, "SendBased"),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|p| p.0 == self).expect("listed").1
    }
}
