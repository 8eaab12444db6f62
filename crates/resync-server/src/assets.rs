//! The browser client and the demo page, compiled into the binary so a fresh checkout serves
//! them with no build step.

use actix_web::{HttpResponse, web};

const RESYNC_JS: &str = include_str!("../../../clients/browser/src/resync.js");
const RESYNC_DTS: &str = include_str!("../../../clients/browser/src/resync.d.ts");
const REACT_JS: &str = include_str!("../../../clients/browser/src/react.js");
const REACT_DTS: &str = include_str!("../../../clients/browser/src/react.d.ts");
const TANSTACK_JS: &str = include_str!("../../../clients/browser/src/tanstack.js");
const TANSTACK_DTS: &str = include_str!("../../../clients/browser/src/tanstack.d.ts");
const DEMO_HTML: &str = include_str!("../../../clients/browser/demo/index.html");

/// The client modules always; the demo page at `/` only with `demo` (the page's chat publishes
/// anonymously, which only the demo allows). Each answers `GET` and `HEAD`.
pub(crate) fn configure(config: &mut web::ServiceConfig, demo: bool) {
    if demo {
        asset(config, "/", || page(DEMO_HTML));
    }
    asset(config, "/client/resync.js", || script(RESYNC_JS));
    asset(config, "/client/resync.d.ts", || typescript(RESYNC_DTS));
    asset(config, "/client/react.js", || script(REACT_JS));
    asset(config, "/client/react.d.ts", || typescript(REACT_DTS));
    asset(config, "/client/tanstack.js", || script(TANSTACK_JS));
    asset(config, "/client/tanstack.d.ts", || typescript(TANSTACK_DTS));
}

/// Serves `respond` at `path` for `GET` and `HEAD` (actix-http sends no body for `HEAD`).
fn asset(config: &mut web::ServiceConfig, path: &str, respond: fn() -> HttpResponse) {
    config.service(
        web::resource(path)
            .route(web::get().to(move || async move { respond() }))
            .route(web::head().to(move || async move { respond() })),
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
