"""A small business schema the tests write to next to absurd's tables."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from absurd_sqla.models import runs, tasks


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = {"schema": "public"}  # noqa: RUF012 - SQLAlchemy reads the class attribute

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    amount: Mapped[int]
    status: Mapped[str] = mapped_column(default="new")


def create_business_tables(url: str) -> None:
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()


def count_tasks(session_or_engine: Any, **where: Any) -> int:
    query = select(func.count()).select_from(tasks)
    for key, value in where.items():
        query = query.where(tasks.c[key] == value)
    if isinstance(session_or_engine, Session):
        return int(session_or_engine.scalar(query) or 0)
    with session_or_engine.connect() as conn:
        return int(conn.scalar(query) or 0)


def count_runs(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(runs)) or 0)
