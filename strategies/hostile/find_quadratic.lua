-- Plain find of a long near-matching needle: subject x needle byte comparisons in one call.
return { plan = function(ctx)
    local subject = string.rep('a', 1 << 21)
    local needle = string.rep('a', 1 << 16) .. 'b'
    while true do
        local i = subject:find(needle, 1, true)
    end
end }
