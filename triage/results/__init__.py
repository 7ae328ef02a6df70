"""Result objects written back to the PACS: pure SEG and SR builders, and their senders."""
