//! `GET /api/v1/openapi.json`: the `OpenAPI` 3 document of the admin API, written by hand and
//! embedded; a test holds its paths and methods in step with [`super::routes`].

use axum::{
    http::header,
    response::{IntoResponse, Response},
};

pub(super) const DOCUMENT: &str = include_str!("openapi.json");

pub(super) async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::api::{routes, Access};

    #[test]
    fn the_document_lists_exactly_the_routes_with_their_access() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.0.3");
        let mut documented = BTreeSet::new();
        for (path, operations) in doc["paths"].as_object().expect("paths") {
            for (method, operation) in operations.as_object().expect("operations") {
                let secured = operation["security"]
                    .as_array()
                    .is_some_and(|s| !s.is_empty());
                let forbidden = operation["responses"].get("403").is_some();
                documented.insert((method.to_uppercase(), path.clone(), secured, forbidden));
            }
        }
        let routed: BTreeSet<_> = routes()
            .into_iter()
            .map(|r| {
                (
                    r.method.to_string(),
                    r.path.to_owned(),
                    r.access != Access::Open,
                    r.access == Access::Change,
                )
            })
            .collect();
        let missing: Vec<_> = routed.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&routed).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "routes not documented (or with another access): {missing:?}\n\
             documented but not routed: {extra:?}"
        );
        // Every path parameter is declared.
        for (path, operations) in doc["paths"].as_object().expect("paths") {
            let names: Vec<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            for operation in operations.as_object().expect("operations").values() {
                for name in &names {
                    let declared = operation["parameters"].as_array().is_some_and(|ps| {
                        ps.iter().any(|p| p["name"] == *name && p["in"] == "path")
                    });
                    assert!(
                        declared,
                        "{path}: the path parameter {name} is not declared"
                    );
                }
            }
        }
    }
}
