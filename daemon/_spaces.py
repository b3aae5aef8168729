"""Spaces and projects: who is in which broadcast group, and what groups the spaces.

The post office asks ``Spaces`` who a `#space` reaches and what a reader may
read; the requests that create and change spaces and projects come here. What
is stored is also kept in memory (loaded at start, written through), so
addressing a space never reads the store. Each write is told to ``changed``:
on a store other daemons share, they load the spaces again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec
import structlog
from chinwag.protocol import Project, Space, SpaceMember
from chinwag.storage import MailStore

from ._addresses import participant_name
from ._errors import RequestError

log = structlog.get_logger("chinwag.mail")

MAX_DEPTH = 3  # a space, its child, its grandchild
MAX_DESCRIPTION = 2000


class Spaces:
    """The spaces and projects of one store, kept in memory and written through."""

    def __init__(self, store: MailStore, changed: Callable[[], None]) -> None:
        self.store = store
        self.changed = changed
        self.by_name: dict[str, Space] = {}
        self.members: dict[str, dict[str, SpaceMember]] = {}
        self.counts: dict[str, int] = {}
        self.projects: dict[str, Project] = {}

    async def load(self) -> None:
        """Read every space, member and project; kept in memory once all are read."""
        spaces, members = await self.store.spaces(), await self.store.members()
        counts, projects = await self.store.space_counts(), await self.store.projects()
        self.by_name = {space.name: space for space in spaces}
        self.members = {space: {m.name: m for m in held} for space, held in members.items()}
        self.counts = counts
        self.projects = {project.name: project for project in projects}

    # --- what a reader may see -------------------------------------------------------

    def is_member(self, space: str, name: str) -> bool:
        return name in self.members.get(space, {})

    def visible(self, space: Space, reader: str | None) -> bool:
        """A public space is everyone's to see; a private one only its members'."""
        return not space.private or (reader is not None and self.is_member(space.name, reader))

    def get(self, raw: str, reader: str | None) -> Space:
        """The space ``raw`` names (``#`` optional) as ``reader`` may see it; else 404."""
        space = self.find(raw, reader)
        if space is None:
            raise RequestError(404, f"No space is named #{_name(raw)}.")
        return space

    def find(self, raw: str, reader: str | None) -> Space | None:
        """``get``, with None for 404."""
        space = self.by_name.get(_name(raw))
        return space if space is not None and self.visible(space, reader) else None

    def readable(self, reader: str) -> list[str]:
        """Every space whose mail ``reader`` may read: the public ones and its own."""
        return [name for name, space in self.by_name.items() if self.visible(space, reader)]

    def joined(self, name: str) -> list[str]:
        """The spaces ``name`` is a member of, by name."""
        return sorted(space for space, members in self.members.items() if name in members)

    def recipients(self, space: Space, sender: str) -> list[str]:
        """Who mail from ``sender`` to ``space`` (as ``get`` gave it) reaches; 409 for an
        archived space."""
        if space.archived:
            raise RequestError(409, f"#{space.name} is archived and takes no more mail.")
        return [name for name in self.members.get(space.name, {}) if name != sender]

    def of_project(self, project: str | None) -> tuple[str, ...] | None:
        """The spaces of ``project`` (404 for an unknown one); None for no project."""
        if project is None:
            return None
        self.project(project)
        return tuple(sorted(n for n, s in self.by_name.items() if s.project == project.casefold()))

    def counted(self, space: Space) -> Space:
        return msgspec.structs.replace(
            space,
            members=len(self.members.get(space.name, {})),
            messages=self.counts.get(space.name, 0),
        )

    def posted(self, space: str) -> None:
        """A message to ``space`` was stored."""
        self.counts[space] = self.counts.get(space, 0) + 1

    # --- spaces ---------------------------------------------------------------------

    async def create(
        self,
        sender: str,
        name: str,
        *,
        description: str,
        parent: str | None,
        project: str | None,
        private: bool,
        at: datetime,
    ) -> Space:
        """Create a space; its creator joins it."""
        name = participant_name(name.strip().removeprefix("#"), "A space's name")
        if name in self.by_name:
            raise RequestError(409, f"A space named #{name} exists already.")
        if len(description) > MAX_DESCRIPTION:
            raise RequestError(400, f"A description is at most {MAX_DESCRIPTION} characters.")
        parent_name = None
        if parent is not None:
            above = self.get(parent, sender)
            if self.depth(above.name) >= MAX_DEPTH:
                raise RequestError(
                    400,
                    f"Spaces nest at most {MAX_DEPTH} deep; #{above.name} is already at "
                    f"depth {MAX_DEPTH}.",
                )
            parent_name = above.name
        if project is not None:
            project = self.project(project).name
        space = Space(
            name=name,
            description=description,
            parent=parent_name,
            project=project,
            private=private,
            created_by=sender,
            created_at=at,
        )
        await self.store.put_space(space)
        self.by_name[name] = space
        await self._set_member(name, sender, at, member=True)
        log.info("space_created", space=name, by=sender, private=private)
        return self.counted(space)

    def depth(self, name: str) -> int:
        depth, space = 1, self.by_name[name]
        while space.parent is not None and space.parent in self.by_name:
            depth, space = depth + 1, self.by_name[space.parent]
        return depth

    async def join(self, sender: str, raw: str, at: datetime) -> None:
        space = self.get(raw, sender)
        if space.archived:
            raise RequestError(409, f"#{space.name} is archived: nobody joins it any more.")
        await self._set_member(space.name, sender, at, member=True)

    async def leave(self, sender: str, raw: str, at: datetime) -> None:
        space = self.get(raw, sender)
        await self._set_member(space.name, sender, at, member=False)

    async def invite(self, sender: str, raw: str, name: str, at: datetime) -> None:
        space = self.get(raw, sender)
        if not self.is_member(space.name, sender):
            raise RequestError(403, f"Only members of #{space.name} invite others to it.")
        if space.archived:
            raise RequestError(409, f"#{space.name} is archived: nobody joins it any more.")
        await self._set_member(space.name, name, at, member=True)

    async def archive(self, sender: str, raw: str) -> None:
        space = self.get(raw, sender)
        if not self.is_member(space.name, sender):
            raise RequestError(403, f"Only members of #{space.name} archive it.")
        if not space.archived:
            archived = msgspec.structs.replace(space, archived=True)
            await self.store.put_space(archived)
            self.by_name[space.name] = archived
            self.changed()

    async def _set_member(self, space: str, name: str, at: datetime, *, member: bool) -> None:
        await self.store.set_member(space, name, at, member=member)
        members = self.members.setdefault(space, {})
        if member:
            members.setdefault(name, SpaceMember(name=name, joined_at=at))
        else:
            members.pop(name, None)
        self.changed()

    def listed(
        self,
        reader: str | None,
        *,
        project: str | None,
        parent: str | None,
        top_level: bool,
        include_archived: bool,
    ) -> list[Space]:
        parent_name = self.get(parent, reader).name if parent is not None else None
        shown = []
        for name in sorted(self.by_name):
            space = self.by_name[name]
            if not self.visible(space, reader):
                continue
            if space.archived and not include_archived:
                continue
            if project is not None and space.project != project:
                continue
            if parent_name is not None and space.parent != parent_name:
                continue
            if top_level and space.parent is not None:
                continue
            shown.append(self.counted(space))
        return shown

    def members_of(self, raw: str, reader: str | None) -> list[SpaceMember]:
        space = self.get(raw, reader)
        members = self.members.get(space.name, {})
        return [msgspec.structs.replace(members[name]) for name in sorted(members)]

    # --- projects --------------------------------------------------------------------

    def project(self, raw: str) -> Project:
        project = self.projects.get(raw.casefold())
        if project is None:
            raise RequestError(404, f"No project is named {raw}.")
        return project

    async def create_project(self, project: Project) -> Project:
        name = participant_name(project.name, "A project's name")
        if name in self.projects:
            raise RequestError(409, f"A project named {name} exists already.")
        project = msgspec.structs.replace(project, name=name)
        _check_project(project)
        await self.store.put_project(project)
        self.projects[name] = project
        self.changed()
        return project

    async def update_project(self, raw: str, fields: dict[str, Any], at: datetime) -> Project:
        project = self.project(raw)
        given = {key: value for key, value in fields.items() if value is not None}
        updated = msgspec.structs.replace(project, **given, updated_at=at)
        _check_project(updated)
        await self.store.put_project(updated)
        self.projects[project.name] = updated
        self.changed()
        return updated

    async def delete_project(self, raw: str) -> None:
        project = self.project(raw)
        using = sorted(n for n, s in self.by_name.items() if s.project == project.name)
        if using:
            raise RequestError(
                409,
                f"Project {project.name} is used by the space"
                f"{'s' if len(using) > 1 else ''} {', '.join('#' + n for n in using)}; "
                "archive or move them first.",
            )
        await self.store.delete_project(project.name)
        del self.projects[project.name]
        self.changed()

    def listed_projects(self, status: str | None, tag: str | None) -> list[Project]:
        return [
            self.projects[name]
            for name in sorted(self.projects)
            if (status is None or self.projects[name].status == status)
            and (tag is None or tag in self.projects[name].tags)
        ]


def _name(raw: str) -> str:
    return raw.strip().removeprefix("#").casefold()


def _check_project(project: Project) -> None:
    if len(project.description) > MAX_DESCRIPTION:
        raise RequestError(400, f"A description is at most {MAX_DESCRIPTION} characters.")
    if not 1 <= len(project.status) <= 32:
        raise RequestError(400, "A project's status is 1 to 32 characters, such as active.")
    if any(not tag or len(tag) > 64 for tag in project.tags):
        raise RequestError(400, "A tag is 1 to 64 characters.")
