"""Metadata API versions, as Nova 34 lists and gates them (nova/api/metadata/base.py).

EC2 versions are compared by their position in the list, as Nova's `_check_version` does;
`latest` is the newest one. OpenStack versions are dates: the version list hides the ones
dated after today (the caller passes today's date in: this module never reads a clock), but a
hidden version can still be requested by name.
"""

from __future__ import annotations

import datetime

__all__ = [
    "EC2_LATEST",
    "EC2_VERSIONS",
    "OS_LATEST",
    "OS_VERSIONS",
    "ec2_at_least",
    "ec2_version",
    "openstack_at_least",
    "openstack_version",
    "visible_openstack_versions",
]

EC2_VERSIONS: tuple[str, ...] = (
    "1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15",
    "2008-02-01", "2008-09-01", "2009-04-04",
)
EC2_LATEST = EC2_VERSIONS[-1]

# FOLSOM, GRIZZLY, HAVANA, LIBERTY, NEWTON_ONE, NEWTON_TWO, OCATA, ROCKY, VICTORIA, EPOXY
OS_VERSIONS: tuple[str, ...] = (
    "2012-08-10", "2013-04-04", "2013-10-17", "2015-10-15", "2016-06-30", "2016-10-06",
    "2017-02-22", "2018-08-27", "2020-10-14", "2025-04-04",
)
OS_LATEST = OS_VERSIONS[-1]

GRIZZLY = "2013-04-04"
HAVANA = "2013-10-17"
LIBERTY = "2015-10-15"
NEWTON_ONE = "2016-06-30"
NEWTON_TWO = "2016-10-06"
VICTORIA = "2020-10-14"

_EC2_INDEX = {v: i for i, v in enumerate(EC2_VERSIONS)}
_OS_INDEX = {v: i for i, v in enumerate(OS_VERSIONS)}


def ec2_version(name: str) -> str | None:
    """The EC2 version a path token names (`latest` resolved), or None if unknown."""
    if name == "latest":
        return EC2_LATEST
    return name if name in _EC2_INDEX else None


def openstack_version(name: str) -> str | None:
    """The OpenStack version a path token names (`latest` resolved), or None if unknown."""
    if name == "latest":
        return OS_LATEST
    return name if name in _OS_INDEX else None


def ec2_at_least(version: str, required: str) -> bool:
    return _EC2_INDEX[version] >= _EC2_INDEX[required]


def openstack_at_least(version: str, required: str) -> bool:
    return _OS_INDEX[version] >= _OS_INDEX[required]


def visible_openstack_versions(today: datetime.date) -> tuple[str, ...]:
    """The `/openstack` listing: versions dated today or earlier, then `latest`."""
    shown = tuple(v for v in OS_VERSIONS if datetime.date.fromisoformat(v) <= today)
    return (*shown, "latest")
