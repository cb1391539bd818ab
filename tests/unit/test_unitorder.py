"""core/unitorder: PERSONALITY_SERVICES with dependencies first."""

from __future__ import annotations

from personalityd.core.unitorder import order_units, template_of, unit_relations


def test_relations_only_from_the_unit_section() -> None:
    text = (
        "[Unit]\nAfter=network.target db.service\n# After=ignored.service\nBefore=web.service\n"
        "Wants=cache.service\n[Service]\nAfter=notaunitkey.service\n"
    )
    after, before = unit_relations(text)
    assert after == {"network.target", "db.service", "cache.service"}
    assert before == {"web.service"}


def test_dependencies_first_then_kind_and_name() -> None:
    files = {
        "nginx.service": "[Unit]\nAfter=php8.2-fpm.service network.target\n",
        "php8.2-fpm.service": "[Unit]\nAfter=network.target\n",
        "mariadb.service": "[Unit]\nBefore=php8.2-fpm.service\n",
        "app.socket": "",
        "clean.timer": "",
    }
    units = ["nginx.service", "clean.timer", "php8.2-fpm.service", "mariadb.service", "app.socket"]
    assert order_units(units, files) == [
        "app.socket",
        "mariadb.service",
        "php8.2-fpm.service",
        "nginx.service",
        "clean.timer",
    ]


def test_cycles_and_duplicates_and_templates() -> None:
    files = {"a.service": "[Unit]\nAfter=b.service\n", "b.service": "[Unit]\nAfter=a.service\n"}
    assert order_units(["b.service", "a.service", "a.service"], files) == ["a.service", "b.service"]
    assert template_of("getty@tty1.service") == "getty@.service"
    files = {"w@.service": "[Unit]\nAfter=z.service\n"}
    assert order_units(["w@1.service", "z.service"], files) == ["z.service", "w@1.service"]
