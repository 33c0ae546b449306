//! Every service, RPC, message, field, oneof, enum and enum value of the
//! protos has a comment: the API is called from other languages through these
//! descriptors (server reflection, generated stubs), where the comments are
//! all the documentation a caller sees.

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet};

/// Paths (field numbers of FileDescriptorProto and its children) as in
/// descriptor.proto: message_type 4, enum_type 5, service 6; a message's field
/// 2, nested_type 3, enum_type 4, oneof_decl 8; an enum's value 2; a service's method 2.
struct Undocumented<'a> {
    file: &'a FileDescriptorProto,
    missing: Vec<String>,
}

impl Undocumented<'_> {
    fn check(&mut self, path: &[i32], name: &str) {
        let documented = self.file.source_code_info.as_ref().is_some_and(|info| {
            info.location
                .iter()
                .any(|l| l.path == path && (l.leading_comments().trim().len() + l.trailing_comments().trim().len()) > 0)
        });
        if !documented {
            self.missing.push(format!("{}: {name}", self.file.name()));
        }
    }

    fn message(&mut self, message: &DescriptorProto, path: Vec<i32>, prefix: &str) {
        let name = format!("{prefix}{}", message.name());
        self.check(&path, &name);
        for (i, field) in message.field.iter().enumerate() {
            self.check(&[path.as_slice(), &[2, i as i32]].concat(), &format!("{name}.{}", field.name()));
        }
        for (i, nested) in message.nested_type.iter().enumerate() {
            if !nested.options.as_ref().is_some_and(|o| o.map_entry()) {
                self.message(nested, [path.as_slice(), &[3, i as i32]].concat(), &format!("{name}."));
            }
        }
        for (i, e) in message.enum_type.iter().enumerate() {
            self.enumeration(e, [path.as_slice(), &[4, i as i32]].concat(), &format!("{name}."));
        }
        // `optional` fields get a synthetic oneof each, which cannot carry a comment.
        let synthetic: Vec<i32> =
            message.field.iter().filter(|f| f.proto3_optional()).filter_map(|f| f.oneof_index).collect();
        for (i, oneof) in message.oneof_decl.iter().enumerate() {
            if !synthetic.contains(&(i as i32)) {
                self.check(&[path.as_slice(), &[8, i as i32]].concat(), &format!("{name}.{} (oneof)", oneof.name()));
            }
        }
    }

    fn enumeration(&mut self, e: &EnumDescriptorProto, path: Vec<i32>, prefix: &str) {
        let name = format!("{prefix}{}", e.name());
        self.check(&path, &name);
        for (i, value) in e.value.iter().enumerate() {
            self.check(&[path.as_slice(), &[2, i as i32]].concat(), &format!("{name}.{}", value.name()));
        }
    }
}

#[test]
fn every_element_of_the_protos_has_a_comment() {
    let set =
        FileDescriptorSet::decode(cohort_proto::FILE_DESCRIPTOR_SET).expect("the built-in descriptor set decodes");
    let mut missing = Vec::new();
    let mut files = 0;
    for file in set.file.iter().filter(|f| f.package() == "cohort.v1") {
        files += 1;
        assert!(file.source_code_info.is_some(), "{}: no source info, so no comments", file.name());
        let mut check = Undocumented { file, missing: Vec::new() };
        for (i, message) in file.message_type.iter().enumerate() {
            check.message(message, vec![4, i as i32], "");
        }
        for (i, e) in file.enum_type.iter().enumerate() {
            check.enumeration(e, vec![5, i as i32], "");
        }
        for (i, service) in file.service.iter().enumerate() {
            check.check(&[6, i as i32], service.name());
            for (j, method) in service.method.iter().enumerate() {
                check.check(&[6, i as i32, 2, j as i32], &format!("{}.{}", service.name(), method.name()));
            }
        }
        missing.extend(check.missing);
    }
    assert_eq!(files, 4, "common, agent, job and security");
    assert!(missing.is_empty(), "undocumented (add a `//` comment above or after each):\n{}", missing.join("\n"));
}
