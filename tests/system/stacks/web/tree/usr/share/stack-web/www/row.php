<?php
// One row from MariaDB, over its Unix socket, as the web stack's check.
mysqli_report(MYSQLI_REPORT_ERROR | MYSQLI_REPORT_STRICT);
$db = new mysqli('localhost', 'stackweb', 'stackweb', 'stackweb', 0, '/run/mysqld/mysqld.sock');
$result = $db->query('SELECT greeting FROM greetings WHERE id = 1');
$row = $result->fetch_assoc();
header('Content-Type: text/plain');
echo 'row: ', $row['greeting'], "\n";
