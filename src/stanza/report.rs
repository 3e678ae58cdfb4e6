//! The XEP-0004 multi-item result (§3.4: `<reported/>` and `<item/>`s), typed with xso: xmpp-parsers 0.23's
//! `DataForm` has only single-item forms, and knock answers a listing (a user's knock tokens) with a table.
//!
//! Only written, never read: a request carrying one is parsed as an ordinary form and ignored.

use xmpp_parsers::data_forms::Field;
use xmpp_parsers::ns;
use xso::{AsXml, FromXml};

/// A result form with one row per item.
#[derive(FromXml, AsXml, Debug, Clone, PartialEq)]
#[xml(namespace = ns::DATA_FORMS, name = "x", on_unknown_attribute = Discard, on_unknown_child = Discard)]
pub struct Report {
    /// Always `result`.
    #[xml(attribute = "type")]
    pub type_: String,
    /// A title for the table.
    #[xml(extract(default, fields(text(type_ = String))))]
    pub title: Option<String>,
    /// The columns: one field per column, with its `var`, `label` and `type`, and no value.
    #[xml(child)]
    pub reported: Reported,
    /// The rows, each with one field (and value) per column.
    #[xml(child(n = ..))]
    pub items: Vec<ReportItem>,
}

/// The columns of a [`Report`].
#[derive(FromXml, AsXml, Debug, Clone, PartialEq)]
#[xml(namespace = ns::DATA_FORMS, name = "reported")]
pub struct Reported {
    /// One field per column.
    #[xml(child(n = ..))]
    pub fields: Vec<Field>,
}

/// One row of a [`Report`].
#[derive(FromXml, AsXml, Debug, Clone, PartialEq)]
#[xml(namespace = ns::DATA_FORMS, name = "item")]
pub struct ReportItem {
    /// The row's values, by column `var`.
    #[xml(child(n = ..))]
    pub fields: Vec<Field>,
}

impl Report {
    /// A table with these columns and rows; each row's fields must name the columns' vars.
    pub fn new(title: &str, columns: Vec<Field>, rows: Vec<Vec<Field>>) -> Report {
        Report {
            type_: "result".into(),
            title: Some(title.to_owned()),
            reported: Reported { fields: columns },
            items: rows
                .into_iter()
                .map(|fields| ReportItem { fields })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minidom::Element;
    use xmpp_parsers::data_forms::FieldType;

    #[test]
    fn writes_a_table_as_xep_0004_has_it() {
        let report = Report::new(
            "Tokens",
            vec![Field::new("id", FieldType::TextSingle)],
            vec![
                vec![Field::text_single("id", "a")],
                vec![Field::text_single("id", "b")],
            ],
        );
        let element = Element::from(report.clone());
        assert!(element.is("x", ns::DATA_FORMS));
        assert_eq!(element.attr("type"), Some("result"));
        let reported = element
            .get_child("reported", ns::DATA_FORMS)
            .expect("reported");
        assert_eq!(reported.children().count(), 1);
        let items: Vec<_> = element
            .children()
            .filter(|c| c.is("item", ns::DATA_FORMS))
            .collect();
        assert_eq!(items.len(), 2);
        assert_eq!(Report::try_from(element).expect("parses"), report);
    }
}
