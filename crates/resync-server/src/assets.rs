//! The browser client and the demo page, compiled into the binary so a fresh checkout serves
//! them with no build step.

use actix_web::{HttpResponse, web};

const RESYNC_JS: &str = include_str!("../../../clients/browser/src/resync.js");
const RESYNC_DTS: &str = include_str!("../../../clients/browser/src/resync.d.ts");
const REACT_JS: &str = include_str!("../../../clients/browser/src/react.js");
const REACT_DTS: &str = include_str!("../../../clients/browser/src/react.d.ts");
const DEMO_HTML: &str = include_str!("../../../clients/browser/demo/index.html");

/// The client modules always; the demo page at `/` only with `demo` (the page's chat publishes
/// anonymously, which only the demo allows).
pub(crate) fn configure(config: &mut web::ServiceConfig, demo: bool) {
    if demo {
        config.route("/", web::get().to(|| async { page(DEMO_HTML) }));
    }
    config
        .route(
            "/client/resync.js",
            web::get().to(|| async { script(RESYNC_JS) }),
        )
        .route(
            "/client/resync.d.ts",
            web::get().to(|| async { typescript(RESYNC_DTS) }),
        )
        .route(
            "/client/react.js",
            web::get().to(|| async { script(REACT_JS) }),
        )
        .route(
            "/client/react.d.ts",
            web::get().to(|| async { typescript(REACT_DTS) }),
        );
}

fn page(body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(body)
}

fn script(body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header(("Cache-Control", "no-cache"))
        .body(body)
}

fn typescript(body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(body)
}
