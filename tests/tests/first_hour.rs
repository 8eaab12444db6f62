//! Issue 13, "the first hour of a new user": each test is named after the defect it proves
//! fixed (`defect_N_…`).

use resync_tests::{JWT_SECRET, TestServer, WsClient};

#[tokio::test]
async fn defect_5_without_the_demo_the_root_serves_no_demo_page() {
    let plain = TestServer::start(|settings| settings.demo = false);
    let root = plain.http.get(plain.url("/")).send().await.unwrap();
    assert_eq!(root.status().as_u16(), 200);
    let text = root.text().await.unwrap();
    assert!(!text.contains("<html"), "no demo page: {text}");
    assert!(text.contains("/sse"), "says what the server offers: {text}");

    let demo = TestServer::start(|settings| settings.demo = true);
    let page = demo.http.get(demo.url("/")).send().await.unwrap();
    assert!(page.text().await.unwrap().contains("<html"));
}

#[tokio::test]
async fn defect_6_a_websocket_upgrade_without_a_token_gets_401_when_anonymous_clients_may_do_nothing()
 {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
        settings.anonymous_subscribe = vec![];
    });
    assert_eq!(WsClient::connect(&server.ws_url("")).await.err(), Some(401));
    assert_eq!(
        resync_tests::raw_ws::RawWs::connect(server.server.addresses[0], "")
            .await
            .err(),
        Some(401)
    );
}
