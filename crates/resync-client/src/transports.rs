//! The three transports, as the connection manager runs them: the one place that names all
//! of them, above both `connection.rs` (when and in which order to try them) and each
//! transport (one session over its wire).

use crate::TransportKind;
use crate::connection::{ConnectFailure, Manager, SessionEnd, Sessions};

/// WebSocket, SSE and long polling.
pub(crate) struct Transports;

impl Sessions for Transports {
    async fn run(
        &self,
        kind: TransportKind,
        manager: &mut Manager,
    ) -> Result<SessionEnd, ConnectFailure> {
        match kind {
            TransportKind::WebSocket => crate::ws::run(manager).await,
            TransportKind::Sse => crate::sse::run(manager).await,
            TransportKind::LongPolling => crate::poll::run(manager).await,
        }
    }
}
