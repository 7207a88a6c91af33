-- pgstate lives in one fixed schema so it never collides with the host application.
CREATE SCHEMA IF NOT EXISTS pgstate;
