"""The metadata documents Nova serves, built purely from the registry's view of an instance.

No I/O here: the view, today's date, random seed bytes and clocks come in as arguments.
Modules: `versions` (version lists and gating), `view` (the view's typed form), `ec2` (the
EC2 tree), `openstack` (meta_data.json, listings), `network_data`, `listing` (Nova's
directory printing and the `Document` type), `documents` (routing a path to a document),
`tokens` (IMDSv2 session tokens), `identity` (signed identity document, JWT),
`invalidation` (which cached instances a change touches).
"""

from openimds.core.metadata.documents import (
    AddressLeaf,
    DocumentOptions,
    DynamicVendorTarget,
    InstanceDocuments,
    PasswordTarget,
    Target,
    normalize_path,
    root_document,
)
from openimds.core.metadata.listing import Document
from openimds.core.metadata.openstack import SeededDocument
from openimds.core.metadata.view import View, parse_view

__all__ = [
    "AddressLeaf",
    "Document",
    "DocumentOptions",
    "DynamicVendorTarget",
    "InstanceDocuments",
    "PasswordTarget",
    "SeededDocument",
    "Target",
    "View",
    "normalize_path",
    "parse_view",
    "root_document",
]
