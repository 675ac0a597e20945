//! Sessions: create, get, list, patch, archive (API.md "Sessions").

mod common;

use common::*;
use serde_json::{json, Value};

const SESSION_KEYS: [&str; 9] = [
    "id",
    "title",
    "metadata",
    "last_seq",
    "archived_seq",
    "version",
    "archived",
    "created_at",
    "updated_at",
];

#[track_caller]
fn assert_session_shape(s: &Value) {
    let obj = s
        .as_object()
        .unwrap_or_else(|| panic!("session is not an object: {s}"));
    let mut keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
    keys.sort_unstable();
    let mut want = SESSION_KEYS.to_vec();
    want.sort_unstable();
    assert_eq!(keys, want, "session members of {s}");
    assert!(s["id"].is_string(), "{s}");
    assert!(s["title"].is_string() || s["title"].is_null(), "{s}");
    assert!(s["metadata"].is_object(), "{s}");
    assert!(s["last_seq"].is_u64(), "{s}");
    assert!(s["archived_seq"].is_u64(), "{s}");
    assert!(s["version"].is_u64(), "{s}");
    assert!(s["archived"].is_boolean(), "{s}");
    for ts in ["created_at", "updated_at"] {
        let text = s[ts]
            .as_str()
            .unwrap_or_else(|| panic!("{ts} not a string in {s}"));
        assert!(
            is_rfc3339_micros_utc(text),
            "{ts} {text:?} is not RFC 3339 UTC with microseconds"
        );
    }
}

fn list_ids(server: &Server, query: &str) -> (Vec<String>, Value) {
    let resp = server.get(&format!("/v1/sessions{query}"));
    assert_eq!(resp.status, 200, "GET /v1/sessions{query}: {}", resp.text());
    let body = resp.json();
    let ids = body["sessions"]
        .as_array()
        .unwrap_or_else(|| panic!("sessions array in {body}"))
        .iter()
        .map(|s| {
            assert_session_shape(s);
            s["id"].as_str().unwrap().to_string()
        })
        .collect();
    (ids, body["next_cursor"].clone())
}

/// Pages through a listing with `limit`, checking that `next_cursor` is the last id of
/// every page and null only on the last one.
fn list_all_paged(server: &Server, filter: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let mut query = format!("?limit={limit}{filter}");
        if let Some(c) = &cursor {
            query.push_str(&format!("&cursor={}", pct(c)));
        }
        let (ids, next) = list_ids(server, &query);
        assert!(
            ids.len() <= limit,
            "page longer than limit {limit}: {ids:?}"
        );
        out.extend(ids.iter().cloned());
        match next {
            Value::Null => return out,
            Value::String(next) => {
                assert_eq!(
                    Some(&next),
                    ids.last(),
                    "next_cursor must be the last id of the page"
                );
                cursor = Some(next);
            }
            other => panic!("next_cursor {other}"),
        }
    }
    panic!("listing did not end");
}

#[test]
fn create_without_id_generates_ses_plus_16_base64url_chars() {
    let server = Server::start(Opts::new("create-noid"));
    let mut seen = std::collections::HashSet::new();
    let attempts: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("Content-Type", "application/json")], ""),
        (vec![], ""),
        (vec![("Content-Type", "application/json")], "{}"),
        (
            vec![("Content-Type", "application/json")],
            r#"{"title":"t"}"#,
        ),
    ];
    for (headers, body) in attempts {
        let resp = server.request("POST", "/v1/sessions", &headers, body.as_bytes());
        assert_eq!(resp.status, 201, "body {body:?}: {}", resp.text());
        let s = resp.json();
        assert_session_shape(&s);
        let id = s["id"].as_str().unwrap().to_string();
        let rest = id
            .strip_prefix("ses_")
            .unwrap_or_else(|| panic!("id {id} lacks ses_"));
        assert_eq!(rest.len(), 16, "id {id}");
        assert!(
            rest.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "id {id} is not base64url"
        );
        assert!(seen.insert(id.clone()), "generated id {id} twice");
        assert_eq!(server.session(&id), s, "GET returns the created session");
    }
}

#[test]
fn create_reply_has_every_field_with_its_type() {
    let server = Server::start(Opts::new("create-fields"));
    let resp = server.post(
        "/v1/sessions",
        r#"{"id":"sess-1","title":"Demo","metadata":{"user":"42","n":{"deep":[1,2]}}}"#,
    );
    assert_eq!(resp.status, 201, "{}", resp.text());
    assert_eq!(
        resp.header("content-type")
            .map(|v| v.starts_with("application/json")),
        Some(true)
    );
    let s = resp.json();
    assert_session_shape(&s);
    assert_eq!(s["id"], "sess-1");
    assert_eq!(s["title"], "Demo");
    assert_eq!(s["metadata"], json!({"user":"42","n":{"deep":[1,2]}}));
    assert_eq!(s["last_seq"], 0);
    assert_eq!(s["archived_seq"], 0);
    assert_eq!(s["version"], 1);
    assert_eq!(s["archived"], false);
    assert!(s["updated_at"].as_str() >= s["created_at"].as_str());
    assert_eq!(server.session("sess-1"), s);

    // title null and metadata absent
    let s = server
        .post("/v1/sessions", r#"{"id":"sess-2","title":null}"#)
        .json();
    assert_session_shape(&s);
    assert_eq!(s["title"], Value::Null);
    assert_eq!(s["metadata"], json!({}));

    // the GET object follows last_seq
    server.append_ok("sess-1", &json!({"type":"t","payload":{}}));
    assert_eq!(server.session("sess-1")["last_seq"], 1);
}

#[test]
fn duplicate_id_is_409_session_exists() {
    let server = Server::start(Opts::new("create-dup"));
    server.create_session("dup");
    let resp = server.post("/v1/sessions", r#"{"id":"dup"}"#);
    assert_error(&resp, 409, "session_exists");
    let resp = server.post(
        "/v1/sessions",
        r#"{"id":"dup","title":"other","metadata":{"a":"b"}}"#,
    );
    assert_error(&resp, 409, "session_exists");
    // the original is untouched
    let s = server.session("dup");
    assert_eq!(s["title"], Value::Null);
    assert_eq!(s["version"], 1);
    // a generated id is just as unique
    let generated = server.post("/v1/sessions", "{}").json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = server.post("/v1/sessions", &json!({ "id": generated }).to_string());
    assert_error(&resp, 409, "session_exists");
}

#[test]
fn invalid_id_is_400_invalid_session_with_field_id() {
    let server = Server::start(Opts::new("create-badid"));
    let long = "a".repeat(129);
    let bad: Vec<Value> = vec![
        json!(""),
        json!("."),
        json!(".."),
        json!(long),
        json!("a b"),
        json!("a/b"),
        json!("a?b"),
        json!("é"),
        json!("a\u{0}b"),
        json!(123),
        json!(["x"]),
        json!({"x":1}),
        json!(true),
    ];
    for id in bad {
        let resp = server.post("/v1/sessions", &json!({ "id": id }).to_string());
        assert_field_error(&resp, "invalid_session", "id");
    }
    // the edges of the rule are valid
    for id in [
        "a".repeat(128),
        "A-Z_a.z:0-9".into(),
        "...".into(),
        ".x".into(),
        "x.".into(),
        "_".into(),
    ] {
        let resp = server.post("/v1/sessions", &json!({ "id": id }).to_string());
        assert_eq!(resp.status, 201, "id {id:?}: {}", resp.text());
        assert_eq!(server.session(&id)["id"], id.as_str());
    }
}

#[test]
fn invalid_title_and_metadata_are_400_with_field() {
    let server = Server::start(Opts::new("create-badfields"));
    // title: string of at most 1 KiB (UTF-8 bytes) or null
    for title in [
        json!(5),
        json!(["t"]),
        json!({}),
        json!(true),
        json!("x".repeat(1025)),
        json!("é".repeat(513)),
    ] {
        let resp = server.post("/v1/sessions", &json!({ "title": title }).to_string());
        assert_field_error(&resp, "invalid_session", "title");
    }
    for (id, title) in [
        ("t1", "x".repeat(1024)),
        ("t2", "é".repeat(512)),
        ("t3", String::new()),
    ] {
        let resp = server.post(
            "/v1/sessions",
            &json!({ "id": id, "title": title }).to_string(),
        );
        assert_eq!(
            resp.status,
            201,
            "title of {} bytes: {}",
            title.len(),
            resp.text()
        );
        assert_eq!(server.session(id)["title"], title.as_str());
    }
    // metadata: a non-object is invalid_metadata
    for metadata in [json!("x"), json!([1]), json!(5), json!(true)] {
        let resp = server.post("/v1/sessions", &json!({ "metadata": metadata }).to_string());
        assert_field_error(&resp, "invalid_metadata", "metadata");
    }
    // metadata over 64 KiB breaks a limit
    let big = json!({ "blob": "x".repeat(70 * 1024) });
    let resp = server.post("/v1/sessions", &json!({ "metadata": big }).to_string());
    assert_field_error(&resp, "invalid_session", "metadata");
    let fits = json!({ "blob": "x".repeat(60 * 1024) });
    let resp = server.post(
        "/v1/sessions",
        &json!({ "id": "m-fits", "metadata": fits }).to_string(),
    );
    assert_eq!(resp.status, 201, "{}", resp.text());
    // broken JSON
    let resp = server.post("/v1/sessions", r#"{"id":"x""#);
    assert_error(&resp, 400, "invalid_json");
    // nothing invalid was created
    let (ids, _) = list_ids(&server, "?archived=all");
    assert!(ids
        .iter()
        .all(|id| id.starts_with('t') || id == "m-fits" || id.starts_with("ses_")));
    assert_eq!(ids.len(), 4, "{ids:?}");
}

#[test]
fn get_unknown_or_rule_breaking_id_is_404_session_not_found() {
    let server = Server::start(Opts::new("get-404"));
    server.create_session("known");
    let long = "a".repeat(129);
    for path in [
        "/v1/sessions/unknown".to_string(),
        "/v1/sessions/KNOWN".to_string(),
        format!("/v1/sessions/{long}"),
        "/v1/sessions/a%20b".to_string(),
        "/v1/sessions/%C3%A9".to_string(),
        "/v1/sessions/..".to_string(),
    ] {
        let resp = server.get(&path);
        assert_error(&resp, 404, "session_not_found");
    }
    assert_eq!(server.session("known")["id"], "known");
}

#[test]
fn list_pages_in_bytewise_order_with_limit_and_cursor() {
    let server = Server::start(Opts::new("list-paging"));
    // bytewise: '-' < '.' < '0' < ':' < 'A' < '_' < 'a'
    let ids = [
        "b", "a", "_x", "Zed", "A", "9", ":c", ".d", "-e", "aa", "a-", "B",
    ];
    for id in ids {
        server.create_session(id);
    }
    let mut sorted: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    sorted.sort(); // String ordering is bytewise
                   // one page holding everything
    let (all, next) = list_ids(&server, "");
    assert_eq!(all, sorted);
    assert_eq!(next, Value::Null);
    let (all, next) = list_ids(&server, &format!("?limit={}", ids.len()));
    assert_eq!(all, sorted);
    assert_eq!(next, Value::Null, "a full last page still ends the listing");
    // pages of 5, 4, 3, 1 (the last page of an exact multiple too)
    for limit in [5, 4, 3, 1] {
        assert_eq!(list_all_paged(&server, "", limit), sorted, "limit {limit}");
    }
    // the cursor is exclusive and need not be an existing id
    let (page, _) = list_ids(&server, "?cursor=a&limit=1000");
    assert_eq!(page, vec!["a-", "aa", "b"]);
    let (page, _) = list_ids(&server, "?cursor=Z");
    assert_eq!(page, vec!["Zed", "_x", "a", "a-", "aa", "b"]);
    let (page, next) = list_ids(&server, "?cursor=zzz");
    assert!(page.is_empty());
    assert_eq!(next, Value::Null);
    // limit bounds
    let (page, _) = list_ids(&server, "?limit=1000");
    assert_eq!(page.len(), ids.len());
    for bad in ["0", "1001", "-1", "abc", "", "1.5"] {
        let resp = server.get(&format!("/v1/sessions?limit={bad}"));
        assert_error(&resp, 400, "invalid_limit");
    }
    let resp = server.get("/v1/sessions?cursor=");
    assert_error(&resp, 400, "invalid_cursor");
}

#[test]
fn list_default_limit_is_100() {
    let server = Server::start(Opts::new("list-default"));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let addr = server.addr();
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                for i in 0..27 {
                    let resp = conn.post_json(
                        "/v1/sessions",
                        &json!({ "id": format!("s{t}-{i:03}") }).to_string(),
                    );
                    assert_eq!(resp.status, 201, "{}", resp.text());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (page, next) = list_ids(&server, "");
    assert_eq!(page.len(), 100);
    assert_eq!(next.as_str(), page.last().map(|s| s.as_str()));
    let (rest, next) = list_ids(&server, &format!("?cursor={}", pct(page.last().unwrap())));
    assert_eq!(rest.len(), 8);
    assert_eq!(next, Value::Null);
}

#[test]
fn list_archived_filter_false_true_all() {
    let server = Server::start(Opts::new("list-archived"));
    for id in ["a1", "a2", "a3", "a4"] {
        server.create_session(id);
    }
    for id in ["a2", "a4"] {
        let resp = server.post(&format!("/v1/sessions/{id}/archive"), "");
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(list_ids(&server, "").0, vec!["a1", "a3"]);
    assert_eq!(list_ids(&server, "?archived=false").0, vec!["a1", "a3"]);
    assert_eq!(list_ids(&server, "?archived=true").0, vec!["a2", "a4"]);
    assert_eq!(
        list_ids(&server, "?archived=all").0,
        vec!["a1", "a2", "a3", "a4"]
    );
    // paging through archived only: next_cursor null only after the last archived one
    assert_eq!(
        list_all_paged(&server, "&archived=true", 1),
        vec!["a2", "a4"]
    );
    assert_eq!(
        list_all_paged(&server, "&archived=false", 1),
        vec!["a1", "a3"]
    );
    for bad in ["yes", "1", "", "TRUE", "none"] {
        let resp = server.get(&format!("/v1/sessions?archived={bad}"));
        assert_error(&resp, 400, "invalid_archived");
    }
}

#[test]
fn list_metadata_filters_are_anded_and_percent_decoded() {
    let server = Server::start(Opts::new("list-metadata"));
    let sessions = [
        ("m1", json!({"user":"42","team":"a b"})),
        ("m2", json!({"user":"42","team":"c"})),
        ("m3", json!({"user":"7","team":"a b"})),
        ("m4", json!({"user":42})),
        ("m5", json!({"nested":{"user":"42"}})),
        ("m6", json!({"a/b":"x&y=z","user":"42"})),
        ("m7", json!({})),
    ];
    for (id, metadata) in &sessions {
        let resp = server.post(
            "/v1/sessions",
            &json!({"id": id, "metadata": metadata}).to_string(),
        );
        assert_eq!(resp.status, 201, "{}", resp.text());
    }
    assert_eq!(
        list_ids(&server, "?metadata.user=42").0,
        vec!["m1", "m2", "m6"]
    );
    assert_eq!(
        list_ids(&server, "?metadata.user=42&metadata.team=a%20b").0,
        vec!["m1"]
    );
    assert_eq!(
        list_ids(&server, "?metadata.team=a%20b").0,
        vec!["m1", "m3"]
    );
    assert_eq!(
        list_ids(&server, "?metadata.team=a%20b&metadata.user=7").0,
        vec!["m3"]
    );
    assert_eq!(
        list_ids(&server, "?metadata.user=42&metadata.team=zzz").0,
        Vec::<String>::new()
    );
    assert_eq!(
        list_ids(&server, "?metadata.user=9").0,
        Vec::<String>::new()
    );
    assert_eq!(
        list_ids(
            &server,
            &format!("?metadata.{}={}", pct("a/b"), pct("x&y=z"))
        )
        .0,
        vec!["m6"]
    );
    assert_eq!(
        list_ids(&server, "?metadata.%75ser=%34%32").0,
        vec!["m1", "m2", "m6"]
    );
    // paging a filtered listing: next_cursor null once no further MATCHING session exists
    assert_eq!(
        list_all_paged(&server, "&metadata.user=42", 1),
        vec!["m1", "m2", "m6"]
    );
    assert_eq!(
        list_all_paged(&server, "&metadata.user=42", 2),
        vec!["m1", "m2", "m6"]
    );
    assert_eq!(
        list_all_paged(&server, "&metadata.team=a%20b", 1),
        vec!["m1", "m3"]
    );
    // combines with archived
    server.post("/v1/sessions/m2/archive", "");
    assert_eq!(list_ids(&server, "?metadata.user=42").0, vec!["m1", "m6"]);
    assert_eq!(
        list_ids(&server, "?metadata.user=42&archived=true").0,
        vec!["m2"]
    );
    assert_eq!(
        list_ids(&server, "?metadata.user=42&archived=all").0,
        vec!["m1", "m2", "m6"]
    );
    // the filter sees patched metadata
    let resp = server.patch("/v1/sessions/m7", r#"{"metadata":{"user":"42"}}"#);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        list_ids(&server, "?metadata.user=42").0,
        vec!["m1", "m6", "m7"]
    );
}

#[test]
fn patch_merges_metadata_shallowly_and_null_removes_a_key() {
    let server = Server::start(Opts::new("patch-merge"));
    let created = server
        .post(
            "/v1/sessions",
            r#"{"id":"p","title":"T","metadata":{"a":1,"b":2,"c":{"x":1}}}"#,
        )
        .json();
    std::thread::sleep(std::time::Duration::from_millis(2));
    let resp = server.patch(
        "/v1/sessions/p",
        r#"{"metadata":{"b":null,"c":{"y":2},"d":"new"}}"#,
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let patched = resp.json();
    assert_session_shape(&patched);
    assert_eq!(patched["metadata"], json!({"a":1,"c":{"y":2},"d":"new"}));
    assert_eq!(patched["title"], "T", "title untouched");
    assert_eq!(patched["version"], 2);
    assert_eq!(patched["created_at"], created["created_at"]);
    assert!(
        patched["updated_at"].as_str().unwrap() > created["updated_at"].as_str().unwrap(),
        "updated_at must move forward: {created} -> {patched}"
    );
    assert_eq!(server.session("p"), patched);

    // title alone; null clears it; metadata untouched
    let resp = server.patch("/v1/sessions/p", r#"{"title":null}"#);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let s = resp.json();
    assert_eq!(s["title"], Value::Null);
    assert_eq!(s["metadata"], json!({"a":1,"c":{"y":2},"d":"new"}));
    assert_eq!(s["version"], 3);
    assert!(s["updated_at"].as_str().unwrap() > patched["updated_at"].as_str().unwrap());

    // both at once, and an empty metadata object still counts as a patch
    let s = server
        .patch("/v1/sessions/p", r#"{"title":"U","metadata":{"a":null}}"#)
        .json();
    assert_eq!(s["title"], "U");
    assert_eq!(s["metadata"], json!({"c":{"y":2},"d":"new"}));
    assert_eq!(s["version"], 4);
    let resp = server.patch("/v1/sessions/p", r#"{"metadata":{}}"#);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["version"], 5);

    // invalid patches
    assert_error(
        &server.patch("/v1/sessions/nope", r#"{"title":"x"}"#),
        404,
        "session_not_found",
    );
    assert_field_error(
        &server.patch("/v1/sessions/p", r#"{"metadata":[1]}"#),
        "invalid_metadata",
        "metadata",
    );
    assert_field_error(
        &server.patch("/v1/sessions/p", r#"{"title":7}"#),
        "invalid_session",
        "title",
    );
    let long_title = json!({ "title": "x".repeat(1025) }).to_string();
    assert_field_error(
        &server.patch("/v1/sessions/p", &long_title),
        "invalid_session",
        "title",
    );
    assert_eq!(
        server.session("p")["version"],
        5,
        "failed patches change nothing"
    );
}

#[test]
fn patch_expected_version_conflict_is_409_with_current_version() {
    let server = Server::start(Opts::new("patch-version"));
    server.create_session("v");
    let resp = server.patch("/v1/sessions/v", r#"{"title":"x","expected_version":5}"#);
    let body = assert_error(&resp, 409, "expected_version_conflict");
    assert_eq!(body["current_version"], 1);
    let s = server.session("v");
    assert_eq!(s["version"], 1);
    assert_eq!(s["title"], Value::Null);

    let resp = server.patch("/v1/sessions/v", r#"{"title":"x","expected_version":1}"#);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["version"], 2);
    // a stale version now conflicts
    let resp = server.patch("/v1/sessions/v", r#"{"title":"y","expected_version":1}"#);
    assert_eq!(
        assert_error(&resp, 409, "expected_version_conflict")["current_version"],
        2
    );
    let resp = server.patch(
        "/v1/sessions/v",
        r#"{"metadata":{"k":"v"},"expected_version":2}"#,
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["version"], 3);
    // archive bumps the version too
    assert_eq!(
        server.post("/v1/sessions/v/archive", "").json()["version"],
        4
    );
    let resp = server.patch("/v1/sessions/v", r#"{"title":"z","expected_version":3}"#);
    assert_eq!(
        assert_error(&resp, 409, "expected_version_conflict")["current_version"],
        4
    );
    // expected_version must be an integer >= 1
    for bad in ["0", "-1", "1.5", "\"1\""] {
        let resp = server.patch(
            "/v1/sessions/v",
            &format!(r#"{{"title":"z","expected_version":{bad}}}"#),
        );
        assert_field_error(&resp, "invalid_session", "expected_version");
    }
    assert_eq!(server.session("v")["version"], 4);
}

#[test]
fn patch_without_title_or_metadata_is_400_invalid_session() {
    let server = Server::start(Opts::new("patch-empty"));
    server.create_session("e");
    for body in ["{}", r#"{"expected_version":1}"#] {
        let resp = server.patch("/v1/sessions/e", body);
        assert_error(&resp, 400, "invalid_session");
    }
    assert_eq!(server.session("e")["version"], 1);
}

#[test]
fn archive_and_unarchive_bump_version_once_and_repeats_change_nothing() {
    let server = Server::start(Opts::new("archive"));
    let created = server.create_session("ar");
    std::thread::sleep(std::time::Duration::from_millis(2));

    let resp = server.post("/v1/sessions/ar/archive", "");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let archived = resp.json();
    assert_session_shape(&archived);
    assert_eq!(archived["archived"], true);
    assert_eq!(archived["version"], 2);
    assert!(archived["updated_at"].as_str().unwrap() > created["updated_at"].as_str().unwrap());

    let again = server.post("/v1/sessions/ar/archive", "").json();
    assert_eq!(again, archived, "repeating archive changes nothing");
    assert_eq!(server.session("ar"), archived);

    std::thread::sleep(std::time::Duration::from_millis(2));
    let unarchived = server.post("/v1/sessions/ar/unarchive", "").json();
    assert_eq!(unarchived["archived"], false);
    assert_eq!(unarchived["version"], 3);
    assert!(unarchived["updated_at"].as_str().unwrap() > archived["updated_at"].as_str().unwrap());
    let again = server.post("/v1/sessions/ar/unarchive", "").json();
    assert_eq!(again, unarchived, "repeating unarchive changes nothing");

    // unarchive of a never-archived session changes nothing either
    let other = server.create_session("never");
    assert_eq!(
        server.post("/v1/sessions/never/unarchive", "").json(),
        other
    );

    assert_error(
        &server.post("/v1/sessions/nope/archive", ""),
        404,
        "session_not_found",
    );
    assert_error(
        &server.post("/v1/sessions/nope/unarchive", ""),
        404,
        "session_not_found",
    );
}

#[test]
fn archived_sessions_are_hidden_from_default_listing_but_appends_and_reads_work() {
    let server = Server::start(Opts::new("archive-append"));
    server.create_session("live");
    server.create_session("old");
    server.append_ok("old", &json!({"type":"t","payload":{"n":1}}));
    server.post("/v1/sessions/old/archive", "");
    assert_eq!(list_ids(&server, "").0, vec!["live"]);

    let reply = server.append_ok("old", &json!({"type":"t","payload":{"n":2}}));
    assert_eq!(reply["seq"], 2);
    let s = server.session("old");
    assert_eq!(s["last_seq"], 2);
    assert_eq!(s["archived"], true);
    assert_eq!(s["version"], 2, "appends do not bump the session version");
    assert_eq!(seqs(&server.all_events("old")), vec![1, 2]);
    let (archived, _) = list_ids(&server, "?archived=true");
    assert_eq!(archived, vec!["old"]);
    let listed = server.get("/v1/sessions?archived=true").json();
    assert_eq!(listed["sessions"][0]["last_seq"], 2);
    // a tail of an archived session works
    let mut ws = Ws::connect(server.addr(), "/v1/sessions/old/tail?cursor=0");
    assert_eq!(
        seqs(&ws.collect_until(2, std::time::Duration::from_secs(10))),
        vec![1, 2]
    );
}
