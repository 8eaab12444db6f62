//! WebSocket close codes and what a client must do after each.
//!
//! resync's own codes sit in the application range 4000-4999 in bands, so a client that meets
//! a code newer than itself still knows what to do from the band alone:
//!
//! | band | meaning |
//! |------|---------|
//! | 4000-4099 | terminal: do not reconnect, reconnecting would fail the same way |
//! | 4100-4199 | reconnect with exponential backoff and jitter |
//! | 4200-4299 | reconnect soon, with a short random delay (spreads a herd), and resume |
//! | 4300-4399 | refresh the credentials first, then reconnect |

/// A WebSocket close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// The client or server is done: never reconnect.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// The peer is going away (page unload); reconnect with backoff.
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// The peer broke WebSocket framing itself (RFC 6455: reserved bits, a forbidden close
    /// code, a data frame inside a fragmented message); terminal.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// No close frame arrived: the connection broke. Never sent, only observed.
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    /// The client sent a message over the server's size limit: drop that message, never resend
    /// it, reconnect with backoff.
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// The server is at its connection limit; reconnect with backoff.
    pub const SERVER_FULL: CloseCode = CloseCode(1013);
    /// The server hit an unexpected condition; reconnect with backoff.
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// The server is restarting; reconnect soon with jitter.
    pub const SERVICE_RESTART: CloseCode = CloseCode(1012);
    /// The client broke the protocol (e.g. it kept sending malformed frames); terminal.
    pub const PROTOCOL_VIOLATION: CloseCode = CloseCode(4000);
    /// The identity may not use this server at all; refreshing would not help; terminal.
    pub const FORBIDDEN: CloseCode = CloseCode(4003);
    /// The server no longer speaks the client's protocol version; terminal.
    pub const UNSUPPORTED_PROTOCOL: CloseCode = CloseCode(4004);
    /// The application disconnected the user and asked it not to come back; terminal.
    pub const DISCONNECTED: CloseCode = CloseCode(4005);
    /// Too many connections or requests; reconnect with backoff.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(4100);
    /// The broker is unavailable; reconnect with backoff.
    pub const BROKER_UNAVAILABLE: CloseCode = CloseCode(4101);
    /// The server is shutting down (deploy, restart); reconnect soon with jitter and resume.
    pub const SHUTDOWN: CloseCode = CloseCode(4200);
    /// The client read too slowly and its buffer overflowed; reconnect soon and resume from
    /// the last position, nothing is lost.
    pub const SLOW_CONSUMER: CloseCode = CloseCode(4201);
    /// The server heard nothing from the client (no pong) for too long; reconnect soon.
    pub const HEARTBEAT_TIMEOUT: CloseCode = CloseCode(4202);
    /// The application disconnected the user and lets it come back: reconnect soon.
    pub const DISCONNECTED_RECONNECT: CloseCode = CloseCode(4203);
    /// The token is missing, invalid or has expired: get a fresh one, then reconnect.
    pub const TOKEN_EXPIRED: CloseCode = CloseCode(4300);

    /// What a client should do after the server closed with this code.
    pub fn advice(self) -> ReconnectAdvice {
        match self.0 {
            1000 | 1002 => ReconnectAdvice::Stop,
            1009 => ReconnectAdvice::Backoff {
                drop_pending_message: true,
            },
            1012 => ReconnectAdvice::Soon,
            4000..=4099 => ReconnectAdvice::Stop,
            4100..=4199 => ReconnectAdvice::Backoff {
                drop_pending_message: false,
            },
            4200..=4299 => ReconnectAdvice::Soon,
            4300..=4399 => ReconnectAdvice::RefreshTokenThenReconnect,
            _ => ReconnectAdvice::Backoff {
                drop_pending_message: false,
            },
        }
    }

    /// The reason text the server sends with the code (at most 123 bytes, as WebSocket requires).
    pub fn reason(self) -> &'static str {
        match self.0 {
            1000 => "done",
            1001 => "going away",
            1002 => "websocket protocol error",
            1006 => "connection lost",
            1009 => "message too big, do not resend",
            1011 => "internal error, reconnect with backoff",
            1012 => "service restart, reconnect",
            1013 => "server full, try again later",
            4000 => "protocol violation",
            4003 => "forbidden",
            4004 => "unsupported protocol version",
            4005 => "disconnected by the server, do not reconnect",
            4100 => "try again later",
            4101 => "broker unavailable, reconnect with backoff",
            4200 => "shutdown, reconnect and resume",
            4201 => "slow consumer, reconnect and resume",
            4202 => "heartbeat timeout, reconnect",
            4203 => "disconnected by the server, reconnect",
            4300 => "token expired, refresh then reconnect",
            _ => "",
        }
    }
}

/// What a client does after its connection closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReconnectAdvice {
    /// Do not reconnect; report the close to the application.
    Stop,
    /// Reconnect after the next exponential-backoff delay (with full jitter).
    Backoff {
        /// The last message the client sent was rejected for size: do not send it again.
        drop_pending_message: bool,
    },
    /// Reconnect after a short random delay (0 to about 1 s), then resume from positions.
    Soon,
    /// Call the token refresher, then reconnect with the new token.
    RefreshTokenThenReconnect,
}

/// Every close code resync sends, for documentation and exhaustive tests.
pub const ALL_CLOSE_CODES: &[CloseCode] = &[
    CloseCode::NORMAL,
    CloseCode::GOING_AWAY,
    CloseCode::PROTOCOL_ERROR,
    CloseCode::MESSAGE_TOO_BIG,
    CloseCode::INTERNAL_ERROR,
    CloseCode::SERVICE_RESTART,
    CloseCode::SERVER_FULL,
    CloseCode::PROTOCOL_VIOLATION,
    CloseCode::FORBIDDEN,
    CloseCode::UNSUPPORTED_PROTOCOL,
    CloseCode::TRY_AGAIN_LATER,
    CloseCode::BROKER_UNAVAILABLE,
    CloseCode::SHUTDOWN,
    CloseCode::SLOW_CONSUMER,
    CloseCode::HEARTBEAT_TIMEOUT,
    CloseCode::TOKEN_EXPIRED,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_documented_contract() {
        use ReconnectAdvice::*;
        let expected = [
            (1000, Stop),
            (1002, Stop),
            (
                1001,
                Backoff {
                    drop_pending_message: false,
                },
            ),
            (
                1006,
                Backoff {
                    drop_pending_message: false,
                },
            ),
            (
                1009,
                Backoff {
                    drop_pending_message: true,
                },
            ),
            (1012, Soon),
            (
                1013,
                Backoff {
                    drop_pending_message: false,
                },
            ),
            (4000, Stop),
            (4003, Stop),
            (
                4100,
                Backoff {
                    drop_pending_message: false,
                },
            ),
            (4200, Soon),
            (4201, Soon),
            (4300, RefreshTokenThenReconnect),
            (4099, Stop),
            (4299, Soon),
            (4399, RefreshTokenThenReconnect),
            (
                4999,
                Backoff {
                    drop_pending_message: false,
                },
            ),
        ];
        for (code, advice) in expected {
            assert_eq!(CloseCode(code).advice(), advice, "code {code}");
        }
    }

    #[test]
    fn every_sent_code_has_a_short_reason() {
        for code in ALL_CLOSE_CODES {
            assert!(
                !code.reason().is_empty() && code.reason().len() <= 123,
                "{code:?}"
            );
        }
    }
}
